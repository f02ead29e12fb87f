"""sm_dist.service.logs: console level and JSON lines, the run directory's DEBUG file, worker output routing."""

from __future__ import annotations

import json
import logging

import pytest

from sm_dist.service.logs import console_level, log_to_run_dir, route_worker_logs, setup_logging


@pytest.fixture(autouse=True)
def _restore():
    yield
    setup_logging("INFO", json_lines=False)
    for h in list(logging.getLogger("sm_dist").handlers):
        if h.get_name() == "sm_dist.file":
            logging.getLogger("sm_dist").removeHandler(h)
            h.close()


def test_console_level_and_json_lines(capsys):
    setup_logging("WARNING", json_lines=True)
    log = logging.getLogger("sm_dist.driver")
    log.info("hidden at WARNING")
    log.warning("rollout worker w0 died")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    rec = json.loads(err[0])
    assert (
        rec["level"] == "WARNING"
        and rec["logger"] == "sm_dist.driver"
        and rec["msg"] == "rollout worker w0 died"
    )
    assert rec["time"].endswith("Z") and console_level() == logging.WARNING


def test_plain_console_and_bad_level(capsys):
    setup_logging("INFO", json_lines=False)
    logging.getLogger("sm_dist.driver").info("actors ready")
    assert capsys.readouterr().err == "[sm-dist] actors ready\n"
    with pytest.raises(ValueError, match="'LOUD'.*DEBUG, INFO"):
        setup_logging("loud")


def test_run_dir_file_keeps_debug_whatever_the_console(tmp_path, capsys):
    setup_logging("ERROR")
    path = log_to_run_dir(tmp_path)
    log_to_run_dir(tmp_path)  # a second call replaces the handler instead of doubling lines
    logging.getLogger("sm_dist.driver").debug("resolved config: ...")
    assert capsys.readouterr().err == ""
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and "DEBUG sm_dist.driver: resolved config" in lines[0]


def test_worker_output_goes_to_the_run_dir_not_the_console(tmp_path):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed = []
    dispatcher.add_handler("ray_print_logs", printed.append)  # stands in for Ray's console printer
    try:
        setup_logging("INFO")
        path = route_worker_logs(tmp_path)
        dispatcher.emit({"lines": ["WARNING vllm chatter"], "pid": 42, "actor_name": "RolloutWorker"})
        assert printed == [] and "(RolloutWorker pid=42) WARNING vllm chatter" in path.read_text()
        setup_logging("DEBUG")  # at DEBUG Ray's printer stays
        dispatcher.add_handler("ray_print_logs", printed.append)
        route_worker_logs(tmp_path)
        dispatcher.emit({"lines": ["engine ready"], "pid": 43, "task_name": "t"})
        assert len(printed) == 1 and path.read_text().count("\n") == 2
    finally:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.remove_handler("sm_dist_worker_logs")

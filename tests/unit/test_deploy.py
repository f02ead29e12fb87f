"""deploy/ and docker/ as shipped: the manifests agree with the config they run and the code they run.

What a cluster operator would otherwise find out one failed pod at a time: the entrypoint's config is in
the image, every path it reads is in the image or under a volume every pod mounts, the volumes are
ReadWriteMany claims that deploy/storage.yaml ships, the GPUs and the learners' custom resource add up,
token auth is set the same way in the manifests and in submit.sh, `ray job stop` waits long enough for
the final checkpoint, and the Dockerfiles install what pyproject.toml pins, failing when it fails.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from sm_dist.config import Config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY, DOCKER = ROOT / "deploy", ROOT / "docker"
APP = "/app"  # docker/Dockerfile.gpu: WORKDIR /app, COPY configs ./configs


def _cluster_specs() -> dict[str, dict]:
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    cluster = yaml.safe_load((DEPLOY / "raycluster.yaml").read_text())
    return {"rayjob.yaml": job["spec"]["rayClusterSpec"], "raycluster.yaml": cluster["spec"]}


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _container(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    return c


def _env(group: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in _container(group).get("env", [])}


def _job_config() -> tuple[Config, str]:
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "sm_dist", "train"], argv
    path = argv[4]
    assert path.startswith(f"{APP}/configs/"), f"the entrypoint's config {path} is not baked into the image"
    local = ROOT / Path(path).relative_to(APP)
    assert local.is_file(), f"{path} is not in the image: {local} does not exist"
    return Config.model_validate(yaml.safe_load(local.read_text())), path


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_every_path_the_job_reads_is_in_the_image_or_on_a_mounted_volume(name):
    cfg, _ = _job_config()
    spec = _cluster_specs()[name]
    claims = {
        d["metadata"]["name"]: d for d in yaml.safe_load_all((DEPLOY / "storage.yaml").read_text()) if d
    }
    for group_name, group in _groups(spec):
        pod = group["template"]["spec"]
        vols = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: vols[m["name"]] for m in _container(group)["volumeMounts"]}
        for v in mounts.values():  # every volume a shipped, ReadWriteMany claim
            claim = claims[v["persistentVolumeClaim"]["claimName"]]
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"], claim
        for key, path in [("model.dir", cfg.model.dir), ("data.train_path", cfg.data.train_path),
                          ("run.run_dir", cfg.run.run_dir)]:  # fmt: skip
            on_volume = any(path.startswith(m.rstrip("/") + "/") for m in mounts)
            in_image = path.startswith(f"{APP}/configs/") and (ROOT / Path(path).relative_to(APP)).exists()
            assert on_volume or in_image, (
                f"{name} {group_name}: {key}={path} is neither mounted nor in the image"
            )
        assert any(cfg.run.run_dir.startswith(m + "/") for m in mounts), (
            "run.run_dir must be on shared storage"
        )


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_gpus_learner_resources_and_autoscaling_match_the_config(name):
    cfg, _ = _job_config()
    spec = _cluster_specs()[name]
    assert spec["rayVersion"] == "2.60.0" and spec.get("enableInTreeAutoscaling") is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # a CPU-only head: no learner or worker lands there
    assert "nvidia.com/gpu" not in _container(head)["resources"]["limits"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    lc, rc = cfg.learner, cfg.rollout

    def gpus(g: dict, replicas: str) -> int:
        return int(_container(g)["resources"]["limits"]["nvidia.com/gpu"]) * g[replicas]

    learner = groups["learner"]
    carried = yaml.safe_load(yaml.safe_load(learner["rayStartParams"]["resources"]))  # KubeRay's quoted JSON
    for res, per in lc.resources.items():
        assert carried[res] * learner["minReplicas"] >= per * lc.num_learners, (res, carried)
    assert gpus(learner, "minReplicas") >= lc.num_learners * lc.gpus_per_learner
    rollout = groups["rollout"]
    assert gpus(rollout, "minReplicas") >= rc.num_workers * rc.gpus_per_worker
    assert rollout["maxReplicas"] > rollout["minReplicas"]  # room for the autoscaler


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_auth_stop_wait_and_image_are_consistent(name):
    spec = _cluster_specs()[name]
    auth = spec["authOptions"]
    assert auth["mode"] == "token"
    submit = (DEPLOY / "submit.sh").read_text()
    assert f"AUTH_SECRET:-{auth['secretName']}" in submit and "RAY_AUTH_TOKEN" in submit
    assert "--from-literal=auth_token=" in (DEPLOY / name).read_text()  # how to create the secret
    head_env = _env(spec["headGroupSpec"])
    cfg, _ = _job_config()  # Ray's default wait is 3 s: no final checkpoint; the driver's own deadline first
    assert int(head_env["RAY_JOB_STOP_WAIT_TIME_S"]) >= cfg.run.stop_timeout_s + 60
    for group_name, group in _groups(spec):
        assert _container(group)["image"] == "sm-dist-image:gpu", group_name  # the placeholder sed replaces
        assert _env(group).get("SM_DIST_RUN_ROOT", "").startswith("/shared/"), group_name
    assert 'sed "s#sm-dist-image:gpu#$IMAGE#"' in (DEPLOY / name).read_text()


def test_dockerfiles_fail_when_their_install_fails_and_match_the_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    gpu, cpu = (DOCKER / "Dockerfile.gpu").read_text(), (DOCKER / "Dockerfile.cpu").read_text()
    for text in (gpu, cpu):
        run_lines = " ".join(re.findall(r"^RUN .*(?:\\\n.*)*", text, flags=re.M))
        assert "|| true" not in run_lines and "2>/dev/null" not in run_lines
        assert "COPY configs ./configs" in text and "WORKDIR /app" in text
    assert '".[gpu,plot]"' in gpu and '".[cpu,plot]"' in cpu  # the pins come from pyproject.toml
    # one Python, with its own pip: a venv of python3.11, used for every install
    assert "python3.11 -m venv /opt/venv" in gpu and "PATH=/opt/venv/bin:$PATH" in gpu
    assert "python3-pip" not in gpu
    torch_pin = re.search(r"torch==([\d.]+)", cpu)[1]
    lo, hi = re.search(r"torch>=([\d.]+),<([\d.]+)", "\n".join(project["dependencies"])).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(lo) <= as_tuple(torch_pin) < as_tuple(hi), (torch_pin, lo, hi)
    ray_pin = next(d for d in extras["gpu"] if d.startswith("ray"))
    assert ray_pin.endswith("==2.60.*")
    for spec in _cluster_specs().values():
        assert spec["rayVersion"].startswith("2.60.")

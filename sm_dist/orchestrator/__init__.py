"""The run orchestrator of `sm-dist train`: builds the actors and drives the actor/learner loop.

- driver.py: the `Trainer` and the loop (`train` is the entry point of `sm-dist train`).
- scheduler.py: the rollout calls in flight, worker deaths, weight-sync deadlines.
- learners.py: the learner ranks as one group (step, publish, checkpoint, rebuild).
- sampler.py: each step's batch, expert and replay halves, bounded staleness.
- scaling.py: rollout workers added or removed mid-run, and the autoscaler.
- faults.py: signal handlers, checkpoints of the learners' state, the rescue checkpoint.
- control.py: the loop's side of the control API (queued calls, the run snapshot).
- actors.py: the run's actors built from its config (buffers, workers, ranks).
- cluster.py: starting or joining Ray with the environment vLLM's CPU build needs.
- storage.py: checks that `run.run_dir` is one storage for every process writing to it.
- validate.py: checks of the user's inputs before anything expensive starts.
"""

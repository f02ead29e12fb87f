"""The run orchestrator of `sm-dist train`: builds the actors and drives the actor/learner loop.

- driver.py: `train` (the entry point of `sm-dist train`), set-up, and `learn`, the learner loop.
  It runs on one event loop, beside the rollout workers' loops and the weights' confirmations.
- run.py: the `Orchestrator`, one run's parts built together from its actors.
- tasks.py: the tasks beside the learner loop on the driver's one event loop, and their fatal error.
- rollouts.py: a self-driving loop per rollout worker (submit, await, count, again); worker deaths.
- weight_sync.py: `WeightSync`, the weights' publish, confirmations, re-sends and deadline.
- learners.py: the learner ranks as one group (step, publish, checkpoint, rebuild).
- sampler.py: each step's batch, expert and replay halves, bounded staleness.
- scaling.py: rollout workers added or removed mid-run; autoscale.py: the autoscaler.
- faults.py: worker restarts, signal handlers, checkpoints and the rescue checkpoint.
- control.py: the loop's side of the control API (queued calls, the run snapshot).
- actors.py: the run's actors built from its config (buffers, workers, ranks).
- cluster.py: starting or joining Ray with the environment vLLM's CPU build needs.
- storage.py: checks that `run.run_dir` is one storage for every process writing to it.
- validate.py: checks of the user's inputs before anything expensive starts.
"""

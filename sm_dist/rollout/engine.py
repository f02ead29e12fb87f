"""Backspace-aware generation over vLLM (DESIGN §2 "Generation with backspace").

vLLM cannot delete a token from a running request, so `<bkspc>` is a *stop token*: when a request
stops on it, the engine records the action, pops the last generated token from that rollout's state
(never a prompt token) and immediately resubmits `prompt + remaining tokens` as a new request. With
automatic prefix caching the re-prefill of the shared prefix is nearly free. Resubmission is
continuous: a rollout that backspaced rejoins the running batch at the next engine step instead of
waiting for a synchronous "round" to drain (a round-based loop idles on the slowest request).

Rules, per rollout:
* `<bkspc>` is impossible at the prompt boundary (nothing generated remains). A vLLM v1 batch-level
  logits processor (`BkspcLogitsProcessor`) sets its logit to -inf for the first step of a request
  whose continuation is empty (sm_dist/rollout/logits.py). The built-in alternatives (`logit_bias`, `bad_words`,
  `allowed_token_ids`) act on *every* step of a request, so they would also forbid a legitimate
  `<bkspc>` after the first new token.
* at most `max_actions` actions (tokens, `<bkspc>`, `<eos>`): each request's `max_tokens` is the
  remaining budget (also clipped to the model length); running out gives finish_reason "length".
* at most `max_backspaces` backspaces: the trace keeps exactly that many; if the policy samples one
  more, that sample is discarded and the rollout ends with finish_reason "action_cap" (truncated,
  not terminal, like "length"). Every recorded action is therefore an unaltered policy sample.
  `Rollout.hit_cap` is true for both caps.

Search (`RolloutParams.no_repeat_deleted`, DESIGN §2 "Decoding a backspace model"): after a
`<bkspc>` the state equals the one before the deleted token, so greedy decoding would rewrite the
token and loop to the cap. In search mode each rollout keeps `state -> tokens deleted there` (state =
the continuation as a tuple) and a token deleted at a state is never chosen again at that state.
It suffices to ban that set at step 0 of each *resubmitted* request, through `BkspcLogitsProcessor`:
within one request the continuation only grows (a request ends at its first `<bkspc>`), so a state is
visited either at step 0 of a request that follows a `<bkspc>`, or by writing a token t from its
parent P. In the second case the state cannot already have a deletion history: it would have been
left downwards since, i.e. t was deleted at P, and P (shorter) would by the same argument have been
re-entered only through a `<bkspc>`, at whose step 0 t is banned (induction on the state length;
the prompt has no parent). `<eos>` is never banned (it ends the rollout, so it is never deleted).

Forced prefixes (`generate(..., prefixes=...)`): `prefixes[i]` are continuation tokens written as
the first actions of every rollout of prompt i, before any sampling (e.g. a wrong digit, to measure
recovery). They are actions, not prompt: recorded in `action_ids`, counted in `max_actions`,
deletable by `<bkspc>`. Their behaviour log-prob is recorded as 0.0: like a forced `<bkspc>`, they
come from a point mass, not from the policy.

Behaviour log-probs (`Rollout.logprobs`): the engine runs vLLM with
`logprobs_mode="processed_logprobs"`, so each value is the log-prob of the sampled action under the
distribution it was *actually sampled from*: after the boundary mask, temperature and top-p (for
temperature 0, log-softmax of the raw logits with the boundary mask). They are diagnostics; the
learner re-scores with its own parameters (DESIGN §1). `score` returns raw model log-probs.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sm_dist.config import RolloutConfig
from sm_dist.rollout.logits import EXTRA_ARGS_KEY, BkspcLogitsProcessor

_CAPS = RolloutConfig.model_fields  # the caps' one default is rollout.*'s (sm_dist/config/rollout.py)


@dataclass(frozen=True)
class RolloutParams:
    """How rollouts are sampled. One instance per `generate` call."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_actions: int = _CAPS["max_actions"].default  # cap on actions per rollout (tokens + <bkspc> + <eos>)
    max_backspaces: int = _CAPS["max_backspaces"].default  # cap on <bkspc> actions (then "action_cap")
    samples_per_prompt: int = 1  # independent rollouts per prompt
    seed: int = 0  # base seed; each request derives its own from (seed, rollout, resubmission)
    logprobs: bool = True  # record behaviour log-probs per action
    forbid_bkspc: bool = False  # never sample <bkspc> (plain generation, e.g. evaluation)
    # Diagnostics / tests / benchmarks only: force <bkspc> at these action indices of every rollout,
    # and/or at each action with this probability (seeded). Ignored where <bkspc> is impossible
    # (prompt boundary) and subject to max_backspaces like a sampled one.
    force_bkspc_at: tuple[int, ...] = ()
    force_bkspc_rate: float = 0.0
    # Backspace as search (module docstring): never choose again a token already deleted at the same
    # state. Makes temperature 0 decoding of a backspace model terminate instead of looping.
    no_repeat_deleted: bool = False
    # Added to the <bkspc> logit wherever <bkspc> is allowed: an inference-time control of how often a
    # backspace fires (negative: rarer). 0 leaves the policy as trained.
    bkspc_bias: float = 0.0

    def __post_init__(self):  # users' values are range-checked by the config (rollout.*) or the eval flags
        assert self.max_actions >= 1 and self.max_backspaces >= 0 and self.samples_per_prompt >= 1, self
        assert 0.0 < self.top_p <= 1.0 and self.temperature >= 0 and 0.0 <= self.force_bkspc_rate <= 1.0, self


@dataclass
class Rollout:
    """One backspace-aware rollout. `collapse(prompt_ids + action_ids, bkspc, len(prompt_ids))`
    equals `prompt_ids + final_ids`."""

    prompt_ids: list[int]
    action_ids: list[int]  # every action: tokens, <bkspc>, the deleted tokens, <eos> if emitted
    logprobs: list[float]  # behaviour log-prob per action (empty if RolloutParams.logprobs is False)
    final_ids: list[int]  # collapsed continuation (no prompt; ends with <eos> when finish is "eos")
    finish_reason: str  # "eos" | "length" | "action_cap"
    num_backspaces: int = 0
    prompt_index: int = 0  # index into the `prompts` given to generate
    sample_index: int = 0  # 0..samples_per_prompt-1

    @property
    def hit_cap(self) -> bool:
        """Truncated by a cap: `max_backspaces` ("action_cap") or `max_actions`/model length ("length")."""
        return self.finish_reason in ("action_cap", "length")


@dataclass
class _Live:
    """Mutable state of one rollout while it is being generated."""

    prompt: list[int]
    prompt_index: int
    sample_index: int
    forced: frozenset[int]  # absolute action indices at which <bkspc> is forced
    seed_index: int  # prompt index used to derive request seeds (prompt_index + index_offset)
    actions: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stack: list[int] = field(default_factory=list)  # generated tokens still present (no prompt)
    n_bkspc: int = 0
    n_requests: int = 0
    finish: str | None = None
    # no_repeat_deleted: continuation state -> token ids deleted at that state
    deleted: dict[tuple[int, ...], set[int]] = field(default_factory=dict)


class BackspaceEngine:
    """A vLLM `LLM` plus the backspace loop. Plain class; one per process (vLLM holds global state)."""

    def __init__(
        self,
        model_dir: str | Path,
        seed: int = 0,
        dtype: str = "float32",
        max_model_len: int = 512,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        worker_extension_cls: str | None = "sm_dist.sync.vllm_ext.WeightSyncExtension",
        max_num_seqs: int = 256,
        rpc_timeout_s: float = 300.0,
        llm_kwargs: dict | None = None,  # more `vllm.LLM` arguments (a transport's `engine_kwargs()`)
    ):
        from transformers import AutoTokenizer
        from vllm import LLM

        from sm_dist.core.vocab import get_bkspc_id

        self.model_dir = str(model_dir)
        tok = AutoTokenizer.from_pretrained(self.model_dir)
        self.bkspc_id = get_bkspc_id(tok)
        self.eos_id = int(tok.eos_token_id)
        self.max_model_len = max_model_len
        self.rpc_timeout_s = rpc_timeout_s
        kwargs = dict(llm_kwargs or {})
        if worker_extension_cls:
            kwargs["worker_extension_cls"] = worker_extension_cls
        if not torch.cuda.is_available():
            # Never chunk a prefill on the CPU: vLLM discards the sample of a partly prefilled request by
            # rewinding its seeded generator (gpu_model_runner._bookkeeping_sync, set_offset), which a
            # CPU generator cannot do ("CPU Generator does not use offset": seeded sampling of a large
            # batch crashed). A budget of every sequence at full length means no prefill is split.
            kwargs["max_num_batched_tokens"] = max_num_seqs * max_model_len
        self.llm = LLM(
            model=self.model_dir, seed=seed, dtype=dtype,
            max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            # log-probs of the logits after BkspcLogitsProcessor's mask: the behaviour policy's own
            logprobs_mode="processed_logprobs", logits_processors=[BkspcLogitsProcessor],
            **kwargs,
        )  # fmt: skip
        self._version = 0
        self._req_counter = itertools.count()

    @property
    def version(self) -> int:
        """Policy version of the loaded weights (0 = the weights in model_dir)."""
        return self._version

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: RolloutParams,
        prefixes: Sequence[Sequence[int]] | None = None,
        index_offset: int = 0,
    ) -> list[Rollout]:
        """Sample `samples_per_prompt` rollouts per prompt; results ordered by (prompt, sample).

        `prefixes[i]`: continuation tokens forced as the first actions of every rollout of prompt i
        (module docstring). `index_offset` is added to the prompt index when deriving request seeds,
        so a caller that splits a prompt list into batches gets the samples of one big call.
        """
        if prefixes is not None and len(prefixes) != len(prompts):
            raise ValueError(f"got {len(prefixes)} prefixes for {len(prompts)} prompts; give one per prompt")
        live = []
        for pi, p in enumerate(prompts):
            prefix = [int(t) for t in prefixes[pi]] if prefixes is not None else []
            self._check_prompt(pi, list(map(int, p)), prefix, params)
            for si in range(params.samples_per_prompt):
                forced = self._forced_steps(params, pi + index_offset, si)
                r = _Live(list(map(int, p)), pi, si, forced, pi + index_offset)
                r.actions, r.stack = list(prefix), list(prefix)
                r.logprobs = [0.0] * len(prefix) if params.logprobs else []
                live.append(r)
        engine = self.llm.llm_engine
        pending: dict[str, int] = {}  # request id -> index into live
        for idx, r in enumerate(live):
            self._submit(engine, pending, idx, r, params)
        while pending:
            for out in engine.step():
                if not out.finished:
                    continue
                idx = pending.pop(out.request_id)
                r = live[idx]
                self._absorb(r, out.outputs[0], params)
                if r.finish is None:
                    self._submit(engine, pending, idx, r, params)
        return [self._to_rollout(r) for r in live]

    def _check_prompt(self, pi: int, prompt: list[int], prefix: list[int], params: RolloutParams) -> None:
        n = len(prompt) + len(prefix)
        if not prompt or n >= self.max_model_len:
            raise ValueError(
                f"prompt {pi} has {len(prompt)} tokens (+{len(prefix)} forced prefix); need 1.."
                f"{self.max_model_len - 1} in all (max_model_len={self.max_model_len})"
            )
        if self.bkspc_id in prefix or self.eos_id in prefix:
            raise ValueError(
                f"prefix {pi}={prefix} contains <bkspc> ({self.bkspc_id}) or <eos> ({self.eos_id}); "
                "a forced prefix must be plain continuation tokens"
            )
        if len(prefix) >= params.max_actions:
            raise ValueError(
                f"prefix {pi} has {len(prefix)} tokens but max_actions={params.max_actions} leaves no "
                "room to generate; raise max_actions or shorten the prefix"
            )

    def _forced_steps(self, params: RolloutParams, pi: int, si: int) -> frozenset[int]:
        forced = set(params.force_bkspc_at)
        if params.force_bkspc_rate > 0:
            rng = random.Random(f"{params.seed}-{pi}-{si}")
            forced |= {k for k in range(params.max_actions) if rng.random() < params.force_bkspc_rate}
        return frozenset(forced)

    def _submit(self, engine, pending: dict[str, int], idx: int, r: _Live, params: RolloutParams) -> None:
        """Submit `prompt + stack` as a new request, or finish the rollout with "length"."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        budget = min(params.max_actions - len(r.actions), self.max_model_len - len(r.prompt) - len(r.stack))
        if budget <= 0:
            r.finish = "length"
            return
        n0 = len(r.actions)
        spec: dict = {"id": self.bkspc_id}
        if params.forbid_bkspc:
            spec["forbid"] = True
        else:
            spec["boundary"] = not r.stack
            force = [k - n0 for k in r.forced if n0 <= k < n0 + budget]
            if force:
                spec["force"] = force
            ban = r.deleted.get(tuple(r.stack), set()) - {self.eos_id}
            if params.no_repeat_deleted and ban:
                spec["ban0"] = sorted(ban)  # why step 0 suffices: module docstring "Search"
            if params.bkspc_bias:
                spec["bias"] = float(params.bkspc_bias)
        sp = SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            seed=(hash((params.seed, r.seed_index, r.sample_index, r.n_requests)) & 0x7FFFFFFF),
            max_tokens=budget,
            stop_token_ids=[] if params.forbid_bkspc else [self.bkspc_id],
            logprobs=0 if params.logprobs else None,
            detokenize=False,
            skip_special_tokens=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            extra_args={EXTRA_ARGS_KEY: spec},
        )
        rid = f"sm{next(self._req_counter)}"
        engine.add_request(rid, {"prompt_token_ids": r.prompt + r.stack}, sp)
        pending[rid] = idx
        r.n_requests += 1

    def _absorb(self, r: _Live, completion, params: RolloutParams) -> None:
        """Append one finished request's tokens to the rollout and decide whether it goes on."""
        ids = list(completion.token_ids)
        lps = completion.logprobs
        for j, t in enumerate(ids):
            if t == self.bkspc_id:
                if r.n_bkspc >= params.max_backspaces:
                    r.finish = "action_cap"  # the extra <bkspc> sample is discarded
                    return
                if not r.stack:  # the boundary mask makes this impossible; fail loudly if it isn't
                    raise RuntimeError(f"<bkspc> sampled at the prompt boundary (rollout {r.prompt_index})")
                deleted = r.stack.pop()
                if params.no_repeat_deleted:
                    r.deleted.setdefault(tuple(r.stack), set()).add(deleted)
                r.n_bkspc += 1
            else:
                r.stack.append(int(t))
            r.actions.append(int(t))
            if params.logprobs:
                r.logprobs.append(float(lps[j][t].logprob))
            if t == self.eos_id:
                r.finish = "eos"
                return
        if len(r.actions) >= params.max_actions:
            r.finish = "length"
        elif not ids or ids[-1] != self.bkspc_id:
            r.finish = "length"  # stopped without <bkspc>/<eos>: budget or model length reached

    def _to_rollout(self, r: _Live) -> Rollout:
        return Rollout(
            prompt_ids=r.prompt,
            action_ids=r.actions,
            logprobs=r.logprobs,
            final_ids=list(r.stack),  # the stack is the collapsed continuation, kept as actions land
            finish_reason=r.finish or "length",
            num_backspaces=r.n_bkspc,
            prompt_index=r.prompt_index,
            sample_index=r.sample_index,
        )

    # ------------------------------------------------------------------ probe and weights
    def score(self, prompt_ids: Sequence[int], action_ids: Sequence[int]) -> list[float]:
        """Raw log-probs of each of `action_ids` after `prompt_ids` under the current weights.

        `action_ids` must be plain tokens (no <bkspc>): it is scored as one contiguous sequence.
        Uses prompt_logprobs, which bypass the prefix cache and every sampling processor.
        """
        from vllm import SamplingParams

        seq = [int(t) for t in prompt_ids] + [int(t) for t in action_ids]
        if self.bkspc_id in action_ids or not prompt_ids or not action_ids:
            raise ValueError("score needs a non-empty prompt and non-empty action_ids without <bkspc>")
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([{"prompt_token_ids": seq}], sp, use_tqdm=False)[0]
        plp = out.prompt_logprobs  # [None, {tok: Logprob}, ...] aligned with seq
        return [float(plp[i][seq[i]].logprob) for i in range(len(prompt_ids), len(seq))]

    def load_weights_bytes(self, blob: bytes, version: int) -> int:
        """Load safetensors bytes (checkpoint names) into every vLLM worker; return the new version.

        Drops the prefix cache afterwards: cached KV blocks were computed with the old weights.
        """
        t0 = time.perf_counter()
        try:
            counts = self.llm.collective_rpc(
                "load_safetensors_bytes", timeout=self.rpc_timeout_s, args=(blob,)
            )
        except TimeoutError as e:
            raise TimeoutError(
                f"weight load of version {version} ({len(blob)} bytes) did not finish within "
                f"{self.rpc_timeout_s}s on the vLLM workers of {self.model_dir}"
            ) from e
        self.weights_changed(version)
        self.last_load_s = time.perf_counter() - t0
        self.last_load_tensors = counts
        return self._version

    def weights_changed(self, version: int | None) -> None:
        """New weights are in the vLLM workers (by any transport): drop the prefix cache, whose KV
        blocks the old weights computed, and tag `version`."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"could not reset the prefix cache after loading weights version {version}")
        if version is not None:
            self._version = int(version)

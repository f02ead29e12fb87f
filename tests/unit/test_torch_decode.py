"""The pure-torch backspace-aware decoder's rules (sm_dist.eval.torch_decode) on a scripted model."""

import torch

from sm_dist.eval.torch_decode import DecodeParams, decode_params, torch_generate

V, BK, EOS = 8, 7, 6


class Scripted(torch.nn.Module):
    """Next-token logits from a table on the last token: row[last] (fp32)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, input_ids, attention_mask, position_ids):
        return type("Out", (), {"logits": self.table[input_ids]})


def _table(**rows):
    t = [[0.0] * V for _ in range(V)]
    for last, prefs in rows.items():
        for a, x in prefs.items():
            t[int(last[1:])][a] = x
    return t


def test_greedy_loops_to_the_cap_and_search_does_not():
    # after the prompt token 0: prefer 1; after 1: prefer <bkspc>, then 2; after 2: <eos>
    m = Scripted(_table(t0={1: 5.0, 2: 4.0}, t1={BK: 5.0, 2: 1.0}, t2={EOS: 5.0}))
    greedy = torch_generate(m, [[0]], DecodeParams(temperature=0, max_backspaces=3), BK, EOS)[0]
    assert greedy.finish_reason == "action_cap" and greedy.action_ids == [1, BK] * 3 + [1]
    search = torch_generate(m, [[0]], decode_params("search", max_backspaces=3), BK, EOS)[0]
    assert search.action_ids == [1, BK, 2, EOS] and search.final_ids == [2, EOS]
    assert search.finish_reason == "eos" and search.num_backspaces == 1


def test_no_bkspc_at_the_boundary_forbid_bias_and_length_cap():
    m = Scripted(_table(t0={BK: 9.0, 3: 1.0}, t3={3: 1.0}))  # <bkspc> best at the boundary
    r = torch_generate(m, [[0]], DecodeParams(temperature=0, max_actions=5), BK, EOS)[0]
    assert r.action_ids[0] == 3 and r.finish_reason == "length" and len(r.action_ids) == 5
    m2 = Scripted(_table(t0={3: 1.0}, t3={BK: 0.5, 3: 1.0}))
    r2 = torch_generate(m2, [[0]], DecodeParams(temperature=0, max_actions=3, bkspc_bias=1.0), BK, EOS)[0]
    assert r2.action_ids[:2] == [3, BK]  # the bias makes <bkspc> the argmax after 3
    r3 = torch_generate(m2, [[0]], decode_params("greedy_no_bkspc", max_actions=3, bkspc_bias=9.0), BK, EOS)[
        0
    ]
    assert BK not in r3.action_ids


def test_forced_prefix_and_seeded_sampling():
    m = Scripted(_table(t0={1: 1.0, 2: 1.0}, t4={BK: 9.0}, t1={EOS: 9.0}, t2={EOS: 9.0}))
    r = torch_generate(m, [[0]], decode_params("search"), BK, EOS, prefixes=[[4]])[0]
    assert r.action_ids[:2] == [4, BK]  # the forced wrong token is an action, and deletable
    p = decode_params("sample", samples=50, seed=3)
    a = [x.action_ids for x in torch_generate(m, [[0]], p, BK, EOS)]
    assert a == [x.action_ids for x in torch_generate(m, [[0]], p, BK, EOS)]  # the seed fixes the draws
    firsts = {x[0] for x in a}
    assert {1, 2} <= firsts  # both equally likely first tokens are drawn

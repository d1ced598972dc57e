"""Token layout and the list constraint, pure numpy."""
import numpy as np
import pytest

from padrec_runtime.errors import InputError, ManifestError
from padrec_runtime.grammar import BOS, EOS, LIST, SEP, Catalogue, ListConstraint, TokenLayout


def small_catalogue():
    layout = TokenLayout(levels=2, codebook=3)
    sids = [[0, 0], [0, 1], [1, 2], [2, 0]]
    return Catalogue(layout, [10, 11, 12, 13], sids, ["a", "b", "c", "d"])


def test_prompt_and_slots():
    cat = small_catalogue()
    p = cat.prompt([11, 12])
    assert p.tolist() == [BOS, 5 + 0, 5 + 3 + 1, SEP, 5 + 1, 5 + 3 + 2, LIST]
    assert cat.layout.slots(p).tolist() == [3, 0, 1, 2, 0, 1, 3]
    assert cat.decode_list([5, 8, SEP, 7, 8, EOS]) == [10, 13]
    assert cat.decode_list([6, 10, SEP]) == [12]
    with pytest.raises(InputError, match="token 10 at position 1 of an item is not in the catalogue"):
        cat.decode_list([5, 8, SEP, 5, 10, EOS])  # (0, 2): no such item


def test_constraint_walks_the_trie_and_forbids_repeats():
    cat = small_catalogue()
    con = ListConstraint(cat, n_items=2, exclude_history=True)
    s = con.start([12])
    assert con.allowed(s).tolist() == [5, 7]  # item 12 is excluded, so code 1 (only 12 under it) is gone
    s = con.advance(s, 5)
    assert con.allowed(s).tolist() == [8, 9]
    s = con.advance(s, 9)
    assert con.allowed(s).tolist() == [SEP]
    s = con.advance(s, SEP)
    assert con.allowed(s).tolist() == [5, 7]
    s = con.advance(s, 5)
    assert con.allowed(s).tolist() == [8]  # [0, 1] is used
    s = con.advance(con.advance(s, 8), EOS)
    assert s.done and len(con.allowed(s)) == 0
    with pytest.raises(InputError, match="not allowed"):
        con.advance(con.start([]), 4)


def test_bad_catalogues_and_requests():
    layout = TokenLayout(levels=2, codebook=3)
    with pytest.raises(ManifestError, match="share a semantic ID"):
        Catalogue(layout, [1, 2], [[0, 1], [0, 1]])
    with pytest.raises(ManifestError, match="codes outside"):
        Catalogue(layout, [1, 2], [[0, 1], [0, 3]])
    cat = small_catalogue()
    with pytest.raises(InputError, match=r"unknown item ids \[99\]"):
        cat.prompt([10, 99])
    with pytest.raises(InputError, match="n_items"):
        ListConstraint(cat, n_items=4).start([10])


def test_slots_of_every_kind():
    layout = TokenLayout(levels=4, codebook=256)
    toks = np.array([BOS, 5, 5 + 256, 5 + 512 + 9, 5 + 768 + 255, SEP, EOS, LIST])
    assert layout.slots(toks).tolist() == [5, 0, 1, 2, 3, 4, 4, 5]
    assert layout.vocab_size == 5 + 1024


def test_fused_chain_walk_matches_the_general_walk():
    """The fused chain's walk (grammar masks built ahead, one masked argmax) accepts exactly what the general
    walk accepts: random logits with ties, chains that follow the target, stray from it, or leave the grammar."""
    from padrec_runtime.loop.accept import ChainPicks, TargetWalk, chain_states
    from padrec_runtime.loop.sampling import SamplingConfig
    from padrec_runtime.loop.state import Node, Root, Scored

    cat = small_catalogue()
    V = cat.layout.vocab_size
    rng = np.random.default_rng(0)
    outcomes = set()
    for trial in range(300):
        con = ListConstraint(cat, n_items=2, exclude_history=True)
        state = con.start([12] if trial % 2 else [])
        for _ in range(rng.integers(0, 4)):  # somewhere inside the list
            state = con.advance(state, rng.choice(con.allowed(state)))
        K = int(rng.integers(1, 6))
        logits = rng.integers(0, 3, size=(K + 1, V)).astype(np.float32)  # small integers: many ties
        # a chain that copies the target's pick for a while, then a random (possibly disallowed) token
        tokens, s = [], state
        for i in range(K):
            if s.done or rng.random() < 0.25:
                tokens.append(int(rng.integers(0, V)))
                s = s if s.done else None
                break
            allowed = con.allowed(s)
            tok = int(allowed[np.argmax(logits[i][allowed])])
            tokens.append(tok)
            s = con.advance(s, tok)
        tokens += [int(rng.integers(0, V)) for _ in range(K - len(tokens))]
        root = Root(token=1, position=3, state=state)
        chain = [Node(0, i - 1, i + 1, 0.0, None) for i in range(K)]
        mask = chain_states(root, chain, np.array(tokens), con, V)
        fast = ChainPicks(con).accept(Scored(logits[None], None, [mask]), 0, root, chain)
        slow = TargetWalk(con, SamplingConfig(), rng).accept(
            Scored(logits[None], None), 0, root, [Node(t, i - 1, i + 1, 0.0, None) for i, t in enumerate(tokens)])
        assert (fast.path, fast.tokens, fast.state) == (slow.path, slow.tokens, slow.state)
        outcomes.add((len(fast.path) - 1 == K, fast.state.done))
    assert len(outcomes) >= 3  # whole chains accepted, chains cut short, and lists finished were all seen


def test_completion_bans_give_the_ban_row_after_an_item_is_completed():
    """chain_ban after the token that completes an item = the row before it, with completion_bans' used-up
    nodes and the new leaf at -inf (what the device-rounds path computes on the device)."""
    layout = TokenLayout(levels=3, codebook=3)
    sids = [[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [1, 0, 2], [2, 2, 2]]
    cat = Catalogue(layout, list(range(100, 106)), sids)
    checked = set()
    for history in ([], [100], [100, 103], [101, 102, 104]):
        con = ListConstraint(cat, n_items=2, exclude_history=True)
        start = con.start(history)
        for a in con.allowed(start):
            for b in con.allowed(con.advance(start, a)):
                s = con.advance(con.advance(start, a), b)  # level L-1: the next token completes an item
                assert s.depth == layout.levels - 1
                for c in con.allowed(s):
                    after = con.advance(s, c)
                    row = con.chain_ban(s).copy()
                    nodes, ends = con.completion_bans(s)
                    row[nodes[ends]] = -np.inf
                    row[after.node] = -np.inf
                    np.testing.assert_array_equal(row, con.chain_ban(after))
                    checked.add(bool(ends[1:].any()))
    assert checked == {True, False}  # completions that use up an inner node, and ones that do not


def test_allows_agrees_with_allowed():
    cat = small_catalogue()
    con = ListConstraint(cat, n_items=2, exclude_history=True)
    states, seen, done = [con.start([12]), con.start([])], 0, 0
    while states:
        s = states.pop()
        allowed = set(con.allowed(s).tolist())
        assert all(con.allows(s, t) == (t in allowed) for t in range(cat.layout.vocab_size))
        seen += 1
        states += [con.advance(s, t) for t in allowed]
        done += s.done
    assert seen > 20 and done > 0  # finished lists too: nothing is allowed after eos


def test_masked_picks_take_the_first_allowed_maximum_and_refuse_non_finite_logits():
    from padrec_runtime.loop.accept import masked_picks as _masked_picks
    from padrec_runtime.errors import BackendError
    logits = np.array([[5.0, 1.0, 1.0, np.nan], [0.0, 2.0, 2.0, 9.0]])
    mask = np.array([[False, True, True, False], [True, True, True, False]])
    assert _masked_picks(logits, mask).tolist() == [1, 1]  # 5 and 9 are not allowed; ties go to the lower id
    mask[0, 3] = True
    with pytest.raises(BackendError, match="non-finite logits"):
        _masked_picks(logits, mask)

"""Token layouts, the item catalogue and the list constraint, pure numpy."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from padrec_runtime.errors import InputError, ManifestError
from padrec_runtime.grammar import BOS, EOS, LAYOUT_KINDS, LIST, PAD, SEP, Catalogue, ListConstraint, TokenLayout


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


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_completion_bans_give_the_ban_row_after_an_item_is_completed(kind):
    """chain_ban after the token that completes an item = the row before it, with completion_bans' used-up
    nodes and the new leaf at -inf (what the device-rounds path computes on the device); after a token that
    does not complete one (digits: a second digit where a code end could also come), the row is unchanged."""
    layout = TokenLayout(levels=3, codebook=13, kind=kind)
    sids = [[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [1, 0, 12], [12, 12, 12], [1, 0, 1]]
    cat = Catalogue(layout, list(range(100, 107)), sids)
    checked = set()
    for history in ([], [100], [100, 103], [101, 102, 104]):
        con = ListConstraint(cat, n_items=2, exclude_history=True)
        states = [con.start(history)]
        while states:  # every state of the first item, depth first
            s = states.pop()
            if not cat.before_leaf[s.node]:
                states += [con.advance(s, t) for t in con.allowed(s)]
                continue
            for c in con.allowed(s):
                after = con.advance(s, c)
                row = con.chain_ban(s).copy()
                if cat.ends_item(after.node):
                    nodes, ends = con.completion_bans(s)
                    assert nodes[0] == 0 and nodes[-1] == s.node and len(nodes) == s.depth + 1
                    row[nodes[ends]] = -np.inf
                    row[after.node] = -np.inf
                    checked.add(bool(ends[1:].any()))
                else:
                    states.append(after)
                    checked.add("continues")
                np.testing.assert_array_equal(row, con.chain_ban(after))
    # completions that use up an inner node, and ones that do not; digits: items that go on past a leaf's parent
    assert checked == ({True, False, "continues"} if kind == "digits" else {True, False})


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


def reference_slots(layout, stream) -> list:
    """Item slots by their definition, token by token: a code token's place in its item (the code tokens since
    the last special token), <sep> / <eos> right after the longest item, any other special token after that."""
    M, out, k = layout.max_item_tokens, [], 0
    for t in stream:
        if t in (SEP, EOS):
            out.append(M)
        elif t < layout.n_special:
            out.append(M + 1)
        else:
            out.append(k)
        k = k + 1 if t >= layout.n_special else 0
    return out


def test_each_layout_spells_items_as_documented():
    codes = (1, 12, 3)
    want = {"per_level": ([5 + 1, 5 + 13 + 12, 5 + 26 + 3], 5 + 39, 3),
            "shared": ([5 + 1, 5 + 12, 5 + 3], 5 + 13, 3),
            "digits": ([5 + 1, 15, 5 + 1, 5 + 2, 15, 5 + 3, 15], 5 + 11, 9)}  # 1 ; 1 2 ; 3 ;  (15: code end)
    for kind, (tokens, vocab, longest) in want.items():
        lay = TokenLayout(levels=3, codebook=13, kind=kind)
        assert list(lay.spell(codes)) == tokens, kind
        assert (lay.vocab_size, lay.max_item_tokens, lay.n_slots) == (vocab, longest, longest + 2), kind
        assert max(tokens) < lay.vocab_size
    with pytest.raises(InputError, match="expected one of per_level, shared, digits"):
        TokenLayout(levels=3, codebook=13, kind="words")


def test_digits_tell_1_2_from_12():
    """Codes 1, 2 and 12 share digit tokens: the code end keeps every item's spelling apart from every other's
    and from the start of every other's, and a list decodes back to its items."""
    layout = TokenLayout(levels=2, codebook=13, kind="digits")
    sids = [[1, 2], [12, 2], [1, 12], [11, 2], [1, 1], [2, 1], [12, 12]]
    cat = Catalogue(layout, list(range(200, 207)), sids)
    spelled = [tuple(cat.list_tokens([i])[:-1]) for i in cat.item_ids]
    assert spelled[0] == (6, 15, 7, 15) and spelled[1] == (6, 7, 15, 7, 15)  # "1;2;" and "12;2;"
    for a in spelled:
        for b in spelled:
            assert a == b or b[:len(a)] != a  # prefix-free, so one-to-one
    items = [203, 200, 206, 201, 204]
    toks = cat.list_tokens(items)
    assert toks[-1] == EOS and cat.decode_list(toks) == items
    assert cat.decode_list(cat.prompt([202, 205])) == [202, 205]
    with pytest.raises(InputError, match="token 8 at position 1 of an item is not in the catalogue"):
        cat.decode_list([6, 8, 15, 7, 15, EOS])  # "13": no item has it
    flat = [t for i in items for t in cat.list_tokens([i])[:-1]]  # the same codes without separators...
    assert cat.decode_list(flat) == items  # ...still parse: each item ends at its last code end


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(LAYOUT_KINDS), levels=st.integers(1, 4), codebook=st.integers(2, 120),
       data=st.data())
def test_items_round_trip_through_tokens_in_every_layout(kind, levels, codebook, data):
    """Random catalogues: each layout spells items one-to-one and prefix-free (every item ends at its own trie
    leaf), and prompts and lists decode back to their items."""
    layout = TokenLayout(levels=levels, codebook=codebook, kind=kind)
    space = codebook ** levels
    flat = data.draw(st.lists(st.integers(0, space - 1), min_size=1, max_size=min(40, space), unique=True))
    sids = [[(f // codebook ** (levels - 1 - l)) % codebook for l in range(levels)] for f in flat]
    cat = Catalogue(layout, [1000 + k for k in range(len(sids))], sids)
    spelled = {tuple(cat.list_tokens([i])[:-1].tolist()) for i in cat.item_ids}
    assert len(spelled) == len(sids)
    assert sorted(cat.leaf_item.values()) == list(range(len(sids)))  # a leaf per item, no leaf inner
    assert all(len(cat.child_tokens[leaf]) == 0 for leaf in cat.leaf_item)
    order = data.draw(st.permutations(list(cat.item_ids)))
    assert cat.decode_list(cat.list_tokens(order)) == list(order)
    assert cat.decode_list(cat.prompt(order)) == list(order)
    assert max(len(s) for s in spelled) <= layout.max_item_tokens


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_slots_are_item_positions_from_any_window(kind):
    """layout.slots over a prompt and list equals the definition token by token; over a window that starts inside
    an item, given the item tokens before it (what the loop's catch-up windows are), too. per_level: the slot is
    also the token's level, read off its id."""
    layout = TokenLayout(levels=3, codebook=13, kind=kind)
    rng = np.random.default_rng(1)
    sids = np.unique(rng.integers(0, 13, (40, 3)), axis=0)
    cat = Catalogue(layout, np.arange(len(sids)) + 500, sids)
    ids = rng.permutation(cat.item_ids)
    stream = np.concatenate([cat.prompt(ids[:6]), cat.list_tokens(ids[6:10])])
    ref = reference_slots(layout, stream)
    assert layout.slots(stream).tolist() == ref
    assert layout.slots(np.stack([stream, stream])).tolist() == [ref, ref]
    for s in range(1, len(stream)):
        before = ref[s] if stream[s] >= layout.n_special else 0
        assert layout.slots(stream[s:], start=before).tolist() == ref[s:], s
    if kind == "per_level":
        code = stream >= layout.n_special
        assert (np.asarray(ref)[code] == (stream[code] - layout.n_special) // layout.codebook).all()
    assert max(ref) == layout.n_slots - 1 and layout.slots([PAD]).tolist() == [layout.n_slots - 1]


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_chain_tables_follow_the_grammar_in_every_layout(kind):
    """The tables the fused chain graph and the device kernel run on (Catalogue.chain_tables) say, at every
    grammar state a walk reaches, what the host grammar says: which token leads to which trie node, which node
    ends an item, and the item slot of every allowed token (its place in the item)."""
    layout = TokenLayout(levels=3, codebook=13, kind=kind)
    rng = np.random.default_rng(2)
    sids = np.unique(rng.integers(0, 13, (30, 3)), axis=0)
    cat = Catalogue(layout, np.arange(len(sids)), sids)
    tab = cat.chain_tables()
    n_nodes, V = cat.n_nodes, layout.vocab_size
    con = ListConstraint(cat, n_items=3, exclude_history=True)
    seen = 0
    for trial in range(30):
        s = con.start(rng.choice(cat.item_ids, 2, replace=False).tolist())
        while not s.done:
            row = tab["next_node"][cat.chain_row(s)]
            allowed = con.allowed(s)
            grammar_free = row != n_nodes
            if cat.ends_item(s.node):
                assert set(np.flatnonzero(grammar_free)) == {SEP, EOS} and tab["is_leaf"][s.node] == 1
                assert all(tab["node_slot"][row[t]] == layout.sep_slot for t in (SEP, EOS))
            else:
                assert tab["is_leaf"][s.node] == 0
                ban = con.chain_ban(s)
                free = np.flatnonzero(grammar_free & np.isfinite(ban[row]))
                assert free.tolist() == allowed.tolist()  # the graph's mask: trie children whose items are free
                for t in allowed:
                    assert row[t] == con.advance(s, t).node
                    assert tab["node_slot"][row[t]] == s.depth  # the item tokens before it
            s = con.advance(s, rng.choice(allowed))
            seen += 1
    assert seen > 100 and tab["next_node"].shape[1] == V

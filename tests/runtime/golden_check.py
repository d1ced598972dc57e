"""Run in a subprocess with torch blocked: the runtime must reproduce the reference's golden lists."""
import importlib.abc
import json
import sys


class _BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked: padrec_runtime must run without torch")
        return None


sys.meta_path.insert(0, _BlockTorch())


def main(engine_dir: str, golden_path: str) -> None:
    from padrec_runtime import DecodeParams, Recommender, RuntimeOptions

    golden = json.loads(open(golden_path).read())
    assert golden["format"] == "padrec-golden" and golden["version"] == 1, golden.get("format")
    rec = Recommender(engine_dir)
    for case in golden["cases"]:
        res = rec.recommend(case["histories"], n_items=case["n_items"], params=DecodeParams(speculate=case["speculate"], draft_steps=case["draft_steps"], tree_topk=case["tree_topk"], tree_size=case["tree_size"]))
        got = [r.tokens for r in res.lists]
        for b, (g, want) in enumerate(zip(got, case["tokens"])):
            first = next((i for i, (x, y) in enumerate(zip(g, want)) if x != y), None)
            status = "ok" if g == want else f"first divergence at token {first}"
            print(f"{case['speculate']:5s} batch {len(got)} row {b}: {status}")
        assert got == case["tokens"], case["speculate"]
        assert res.committed == case["committed"], "acceptance differs from the reference"
    assert "torch" not in sys.modules
    print("golden: all equal")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

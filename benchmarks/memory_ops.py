"""Edits with ids at lifelong scale (issue #12, item 4): remove one edit from the middle of a long stream, and save
→ load the memory into a fresh process.

    python benchmarks/memory_ops.py --method grace --edits 1000 --model testbed-gpt2 --threads 1
    python benchmarks/memory_ops.py --method wise --edits 1000 --model testbed-llama

Makes ``--edits`` edits of distinct testbed facts one after another (``kedit.edit`` per request, every earlier
edit live), records the greedy answer of every edited prompt and of ``--probes`` unedited facts, then:

1. **remove the middle edit** (``kedit.memory.remove_edit``): the removed fact's greedy answer must equal its
   pre-edit answer (and, for GRACE, its logits bitwise), every other edit's answer and every probe's must be
   unchanged;
2. **save → load in a fresh process** (``save_memory`` here, ``load_memory`` onto a freshly loaded base model in a
   child process): every answer must be identical;
3. a memory saved for the **other** testbed model is refused (``MemoryFormatError``).

Prints one line per check with the counts; exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _prompts(n_edits: int, n_probes: int) -> tuple[list, list[str]]:
    from kedit.cli import resolve_requests

    edits = resolve_requests("testbed:0-1500", limit=n_edits, whole=True)
    edited = {r.subject for r in edits}
    probes = [r.text for r in resolve_requests("testbed:0-1500") if r.subject not in edited][:n_probes]
    return edits, probes


def _answers(model, tok, prompts: list[str]) -> list[str]:
    from kedit.api import greedy_answers

    return greedy_answers(model, tok, prompts, max_new_tokens=12)


def child(model_name: str, directory: str, n_edits: int, n_probes: int) -> None:
    import kedit
    from kedit.memory import load_memory

    model, tok = kedit.load_model(model_name)
    load_memory(model, directory)
    edits, probes = _prompts(n_edits, n_probes)
    print(json.dumps(_answers(model, tok, [r.text for r in edits] + probes)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="testbed-gpt2")
    ap.add_argument("--method", default="grace")
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a._child:
        child(a._child[0], a._child[1], a.edits, a.probes)
        return 0
    from tqdm import tqdm

    import kedit
    from kedit.memory import MemoryFormatError, edit_ids, load_memory, remove_edit, save_memory

    model, tok = kedit.load_model(a.model)
    edits, probes = _prompts(a.edits, a.probes)
    prompts = [r.text for r in edits] + probes
    pre = _answers(model, tok, prompts)
    mid = len(edits) // 2
    with torch.no_grad():
        pre_logits = model(input_ids=torch.tensor([tok(edits[mid].text)["input_ids"]])).logits
    t0 = time.perf_counter()
    results = [kedit.edit(model, tok, [r], method=a.method, evaluate=False) for r in tqdm(edits, desc="edits")]
    edit_s = time.perf_counter() - t0
    live = _answers(model, tok, prompts)
    ok_edits = sum(kedit.api.answers_match(live[i], r.target_new) for i, r in enumerate(edits))
    print(f"{a.model} {a.method}: {len(edits)} edits in {edit_s:.0f}s; {ok_edits} give their target with all live; "
          f"{sum(x == y for x, y in zip(live[len(edits):], pre[len(edits):]))}/{len(probes)} probes unchanged")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        save_memory(model, tmp)
        out = subprocess.run([sys.executable, __file__, "--model", a.model, "--edits", str(a.edits), "--probes",
                              str(a.probes), "--threads", "1", "--_child", a.model, tmp],
                             capture_output=True, text=True, check=True)
        loaded = json.loads(out.stdout.strip().splitlines()[-1])
        same = sum(x == y for x, y in zip(loaded, live))
        print(f"save -> load in a fresh process: {same}/{len(live)} answers identical")
        failed |= same != len(live)
        other = "testbed-llama" if a.model == "testbed-gpt2" else "testbed-gpt2"
        m2, _ = kedit.load_model(other)
        try:
            load_memory(m2, tmp)
            print(f"loading onto {other}: NOT refused")
            failed = True
        except MemoryFormatError as e:
            print(f"loading onto {other}: refused ({str(e)[:90]}...)")
    ids = edit_ids(model)
    remove_edit(model, results[mid].deltas[0].updates[0].edit_id)
    after = _answers(model, tok, prompts)
    with torch.no_grad():
        post_logits = model(input_ids=torch.tensor([tok(edits[mid].text)["input_ids"]])).logits
    back = after[mid] == pre[mid]
    others = sum(after[i] == live[i] for i in range(len(prompts)) if i != mid)
    print(f"remove edit {mid} of {len(ids)}: its answer back to pre-edit: {back} (logits bitwise: "
          f"{torch.equal(pre_logits, post_logits)}); {others}/{len(prompts) - 1} other answers unchanged")
    failed |= not back or others != len(prompts) - 1
    for r in results:
        for d in r.deltas:
            if d.is_applied:
                d.revert(model)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

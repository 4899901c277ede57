"""Outside reference for the cache policies: NVIDIA kvpress's presses on the source model, same text and budgets.

kvpress pins transformers < 5.3, so it runs in a virtual environment of its own that reuses this machine's torch,
from the repo root (where `-m` finds the bench package and this checkout's kvconvert before any installed one):

    python -m venv --system-site-packages .venv-kvpress
    .venv-kvpress/bin/pip install "kvpress==0.5.5" "transformers>=5.0,<5.3" "kernels<0.12"
    .venv-kvpress/bin/python -m bench.kvpress_ref --cpu      # 3 windows, budgets 5% and 25%, passkey 2k x 10
    .venv-kvpress/bin/python -m bench.kvpress_ref --suite --cpu   # the long-context suite (bench.long_policies')

(`kernels` newer than 0.11, which this machine may carry, breaks transformers 5.2's import.)

kvpress's protocol: a press compresses the context once, during its prefill; what follows (the scored tokens, the
question) extends the compressed cache uncompressed. So, for every press × budget and the full cache:
perplexity of the last --score-last tokens of each --window-token window of Persuasion, the first W - score_last
tokens being the compressed context (the same windows as bench/zsmerge.py; compare with its --prompt-only rows,
which run kvconvert's policies under this protocol), and passkey accuracy at --passkey lengths (the filler and the
hidden key are the context, the question "What is the pass key?" is not compressed; greedy, first number = key).
Budgets are kept tokens as a share of the window (text) or of the whole prompt (passkey), as in bench/zsmerge.py.
Writes bench/results/kvpress_smollm2[_cpu].json.

--suite: instead, kvconvert's long-context suite (`kvconvert.longcontext`, the trials of bench/long_policies.py:
same seeds, haystack, tasks, lengths and presets), each haystack compressed by the press, the question and the
greedy reply added uncompressed; a press keeps as many tokens as kvconvert's policy at that budget (a share of the
prompt and its reply). Paired with the full cache trial by trial. Writes bench/results/kvpress_suite_smollm2[_cpu].json.
KVzip (kvpress's, which masks the evicted entries per head instead of dropping them and spreads the budget over
layers and heads) is among the presses here.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from bench.common import argument_parser, data_file, policy_presets, suite_presets, write_result


def make_press(name: str, ratio: float):
    from kvpress import ExpectedAttentionPress, KVzipPress, SnapKVPress, StreamingLLMPress

    if name == "kvzip":
        return KVzipPress(compression_ratio=ratio)
    if name == "streaming":
        return StreamingLLMPress(compression_ratio=ratio, n_sink=4)
    if name == "snapkv":
        return SnapKVPress(compression_ratio=ratio)
    if name == "expected_attention":
        return ExpectedAttentionPress(compression_ratio=ratio)
    raise SystemExit(f"error: unknown press {name!r}")


@torch.no_grad()
def compressed_prefill(model, press, context: torch.Tensor, keep: int):
    """Prefill `context` (1, C) under `press` (compressed to about `keep` tokens): (cache, logits of the next token)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if press is None:
        return cache, model(input_ids=context, past_key_values=cache, logits_to_keep=1).logits
    with press(model):
        logits = model(input_ids=context, past_key_values=cache, logits_to_keep=1).logits
    kept = cache.get_seq_length()
    if abs(kept - keep) > 1 and not hasattr(press, "score_kvzip"):  # KVzip masks entries instead of dropping them
        raise RuntimeError(f"press kept {kept} tokens, expected {keep}")
    return cache, logits


@torch.no_grad()
def extend(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Run ids (1, T) over the (compressed) cache at their true positions start.. (uncompressed); logits (1, T, V)."""
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
    return model(input_ids=ids, past_key_values=cache, position_ids=positions).logits


def press_generator(model, press_name: str, budget: float, device: str):
    """`generate(ids, max_new, context)` for kvconvert.longcontext.run_suite: the first `context` ids compressed by the
    press to the tokens kvconvert's policy keeps at `budget`, the rest and max_new greedy tokens uncompressed."""

    def generate(ids: list[int], max_new: int, context: int | None = None) -> list[int]:
        context = context or len(ids)
        keep = math.ceil(budget * (len(ids) + max_new))  # the runtime's policy: a share of its whole context
        press = None if press_name == "full" or keep >= context else make_press(press_name, 1 - keep / context)
        cache, logits = compressed_prefill(model, press, torch.tensor([ids[:context]], device=device),
                                           context if press is None else keep)
        if context < len(ids):
            logits = extend(model, cache, torch.tensor([ids[context:]], device=device), context)
        new, pos = [], len(ids)
        for _ in range(max_new):  # greedy, no stop token (as kvconvert's runtime_generator)
            new.append(int(logits[:, -1].argmax(-1)))
            logits = extend(model, cache, torch.tensor([[new[-1]]], device=device), pos)
            pos += 1
        return new

    return generate


def run_suite_rows(args, model, tok, device: str) -> None:
    """--suite: the presses on the long-context suite, paired with the full cache."""
    from kvconvert.longcontext import compare_suites, run_suite

    budgets, lengths, tasks, trials, sentences, haystack = suite_presets(args, device == "cuda")
    name = args.name or ("kvpress_suite_smollm2" + ("_cpu" if args.cpu else ""))
    rows: list[dict] = []

    def save():
        return write_result(name, {"model": args.model, "tasks": tasks, "lengths": lengths, "trials": trials,
                                   "haystack": haystack,
                                   "question": "after compression", "rows": rows})

    full = None
    for press_name in ["full", *args.presses.split(",")]:
        for budget in [1.0] if press_name == "full" else budgets:
            t0 = time.perf_counter()
            got = run_suite(model, tok, tasks, lengths, trials, sentences=sentences,
                            generate=press_generator(model, press_name, budget, device))
            seconds = round(time.perf_counter() - t0, 1)
            if full is None:
                full = got
                rows.append({"method": "full", "budget": 1.0, "suite": full, "seconds": seconds})
                print(f"full: {[(r['task'], r['length'], sum(r['passed'])) for r in full]} ({seconds:.0f} s)", flush=True)
                save()
                continue
            paired = compare_suites(got, full)
            passed = sum(sum(r["passed"]) for r in paired)
            of_full = passed / max(1, sum(sum(r["passed"]) for r in full))
            rows.append({"method": press_name, "budget": budget, "suite": paired, "passed": passed,
                         "of_full": of_full, "seconds": seconds})
            save()
            print(f"{budget:5.2f} {press_name:20s} " + "  ".join(
                f"{r['task']}@{r['length']} {sum(r['passed'])}/{r['trials']} (w{r['wins']} l{r['losses']} p {r['p']:.2f})"
                for r in paired) + f"  pooled {of_full:.0%} of full ({seconds:.0f} s)", flush=True)
    print(f"wrote {save()}")


def parse_args() -> argparse.Namespace:
    ap = argument_parser(__doc__, python=".venv-kvpress/bin/python")
    ap.add_argument("--cpu", action="store_true", help="the small CPU preset")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default=None, help="default: ../shared/data/austen_persuasion.txt (--suite: "
                    "austen_northangerabbey.txt; 'generated' for the built-in haystack)")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--score-last", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--budgets", default=None)
    ap.add_argument("--presses", default=None, help="default streaming,snapkv,expected_attention (--suite: and kvzip)")
    ap.add_argument("--passkey", default=None, help="lengths, e.g. 2048,4096 ('none': perplexity only)")
    ap.add_argument("--passkey-trials", type=int, default=None)
    ap.add_argument("--suite", action="store_true", help="the long-context suite instead (see above)")
    ap.add_argument("--lengths", default=None, help="--suite: prompt lengths (default 2048; GPU 2048,4096)")
    ap.add_argument("--tasks", default=None, help="--suite: default single,multikey (GPU: every task)")
    ap.add_argument("--trials", type=int, default=None, help="--suite: per task and length (default 6; GPU 20)")
    ap.add_argument("--name", default=None, help="result file name (default kvpress_smollm2[_cpu])")
    return ap.parse_args()


def text_nll(model, press, windows: torch.Tensor, ctx: int, keep: int, device: str) -> tuple[float, int, list[float]]:
    """(summed NLL, scored tokens, mean NLL per window): each window (N, W) prefilled to `ctx` under `press`, its
    last W - ctx tokens scored over the compressed cache."""
    W = windows.shape[1]
    nll, count, per_window = 0.0, 0, []
    for n in range(windows.shape[0]):
        ids = windows[n : n + 1].to(device)
        cache, first = compressed_prefill(model, press, ids[:, :ctx], keep)
        logits = torch.cat([first, extend(model, cache, ids[:, ctx:-1], ctx)], 1)
        logp = F.log_softmax(logits.float(), -1)
        window_nll = -logp.gather(-1, ids[:, ctx:, None]).sum().item()
        nll += window_nll
        count += W - ctx
        per_window.append(window_nll / (W - ctx))
    return nll, count, per_window


def passkey_hits(model, tok, press_name: str, budget: float, lengths: list[int], trials: int, device: str
                 ) -> dict[str, float]:
    """{length: accuracy}: kvconvert's passkey trials, the filler and key compressed by the press, the question not."""
    from kvconvert.evaluate import PASSKEY_QUESTION, passkey_found, passkey_trials

    question = tok(PASSKEY_QUESTION, add_special_tokens=False)["input_ids"]
    passkey = {str(n): 0.0 for n in lengths}
    for length, key, ids in passkey_trials(tok, lengths, trials):  # the keys and depths of kvconvert's eval
        if ids[-len(question):] != question:
            raise RuntimeError("the passkey prompt does not end with the question")
        context, asked = ids[: -len(question)], ids[-len(question):]
        keep_p = math.ceil(budget * len(ids))
        p = None if press_name == "full" else make_press(press_name, 1 - keep_p / len(context))
        cache, _ = compressed_prefill(model, p, torch.tensor([context], device=device), keep_p)
        logits = extend(model, cache, torch.tensor([asked], device=device), len(context))[:, -1]
        new, pos = [], len(ids)
        for _ in range(8):  # greedy, over the same cache
            new.append(int(logits.argmax(-1)))
            logits = extend(model, cache, torch.tensor([[new[-1]]], device=device), pos)[:, -1]
            pos += 1
        passkey[str(length)] += passkey_found(tok.decode(new, skip_special_tokens=True), key)
    return {n: hits / trials for n, hits in passkey.items()}


def main() -> None:
    args = parse_args()
    windows_n = args.windows or (3 if args.cpu else 8)
    budgets, lengths, trials = policy_presets(args)

    import kvpress
    import transformers

    from kvconvert.convert.source import load_source, resolve
    from kvconvert.evaluate import read_text, text_windows

    transformers.utils.logging.disable_progress_bar()
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    src = load_source(resolve(args.model), dtype=dtype)
    model, tok = src.model.to(device).eval(), src.tokenizer
    if args.suite:
        import tempfile

        args.presses = args.presses or "streaming,snapkv,expected_attention,kvzip"
        with tempfile.TemporaryDirectory() as folder:  # KVzip loads the tokenizer from the model's name_or_path
            tok.save_pretrained(folder)
            model.config.name_or_path = folder
            run_suite_rows(args, model, tok, device)
        return
    args.presses = args.presses or "streaming,snapkv,expected_attention"
    text = read_text(data_file("austen_persuasion.txt", args.text))
    windows = text_windows(tok, text, args.window, args.window * windows_n)
    W, ctx = windows.shape[1], windows.shape[1] - args.score_last

    rows = []
    for press_name in ["full", *args.presses.split(",")]:
        for budget in [1.0] if press_name == "full" else budgets:
            t0 = time.perf_counter()
            keep = math.ceil(budget * W)
            press = None if press_name == "full" else make_press(press_name, 1 - keep / ctx)
            nll, count, per_window = text_nll(model, press, windows, ctx, keep, device)
            passkey = passkey_hits(model, tok, press_name, budget, lengths, trials, device)
            row = {"press": press_name, "budget": budget, "perplexity": math.exp(nll / count), "predictions": count,
                   "window_nll": per_window,
                   "passkey": passkey, "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"{press_name:18s} {budget:5.2f}: ppl {row['perplexity']:9.3f}  passkey {passkey}  ({row['seconds']} s)",
                  flush=True)
    full = rows[0]["perplexity"]
    for row in rows:
        row["ppl_vs_full"] = row["perplexity"] / full
    path = write_result(args.name or "kvpress_smollm2" + ("_cpu" if args.cpu else ""), {
        "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
        "transformers_in_venv": transformers.__version__, "window": W, "score_last": args.score_last,
        "windows": windows_n, "passkey_trials": trials, "budgets": budgets, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

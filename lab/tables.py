"""The tables of lab/RESULTS.md and README.md, made from the committed records in lab/results/.

A record is what a script's --json wrote, with the command that made it and the commit it ran at
inside: one passkey trial (passkey.py, lab/needles.py: passkey-*.json, distractors-*.json), one
prefill's NLL by position (lab/perplexity.py: perplexity-*.json), or a benchmark run
(lab/bench.py: bench-*.json); a printout (diagnose-*.txt, estimate-*.txt) has its command and
commit on its first line. A command that writes lab/results/ runs as written from the repository
root; the older ones wrote results/ from the old top level, some with options since removed, and
are listed with the commit they ran at (command_line).

The Markdown files call these functions from cog blocks (cogapp), from the repository root:
`python -m cogapp -r lab/RESULTS.md README.md` rewrites the tables from the records, and
`python -m cogapp --check lab/RESULTS.md README.md` (in the test suite) fails when a table and
its records disagree.

    python -m lab.tables    # print the distractor tables
"""
import json
import os
from collections import defaultdict
from pathlib import Path

# LONGHEADS_RESULTS: another folder of records (the test that a changed record fails the check)
RESULTS = Path(os.environ.get("LONGHEADS_RESULTS", Path(__file__).parent / "results"))
FULL_LENGTH = 8192  # the trained length of the default model: where full attention is the bar
WRITES = "--json lab/results/"  # a command that writes here runs as written (command_line)
DEMO = "passkey-32768-filler.json"  # the demo's run, in the README
# what passkey.py's records leave out: the paper's prompt, one key
PAPERS_PROMPT = dict(haystack="filler", wording="passkey", distractors=[], label=None)


def records(pattern="distractors-*.json"):
    """Every trial of the record files matching pattern, in file order (the demo's with the
    fields of the paper's prompt filled in)."""
    return [trial(r) for file in sorted(RESULTS.glob(pattern))
            for r in json.loads(file.read_text())]


def trial(r):
    """A passkey record with every field lab/needles.py writes: passkey.py's lack the prompt's."""
    if "key" not in r or "haystack" in r:
        return r  # not a passkey trial, or one of lab/needles.py's
    return {**PAPERS_PROMPT, **r, "outcome": "yes" if r["correct"] else "no key"}


def setting(r):
    """A record's attention in a few words: full, truncated, window, or LongHeads' w x K and the
    options that differ from the paper's."""
    if r["attention"] != "longheads":
        return r["attention"]
    # layout, select, ...: options of records made before the library dropped them
    words = [f"{r['chunk_size']} × {r['num_chunks']}", r.get("layout", "position")]
    if r.get("select", "summary") != "summary":
        words.append(r["select"])
    if r.get("local_chunks", 2) != 2:
        words.append(f"local {r['local_chunks']}")
    if r.get("select_layers"):
        words.append("layers {}-{}".format(*r["select_layers"]))
    if r.get("full_chunks"):
        words.append(f"full {r['full_chunks']}")
    return " ".join(words)


NAMES = {"256 × 32 position": "256 × 32 position (the paper's rule)",
         "128 × 8 position": "128 × 8 position (the retrieval setting)",
         "128 × 8 score": "128 × 8 score (the retrieval setting before ec16064)",
         "window": "window (256 × 32, local 31)"}


def name(s):
    """A setting as a table shows it: the two named settings and the window say what they are."""
    return NAMES.get(s, s)


def prompt(r):
    return f"{r['haystack']}, {r['wording']}"


def cell(rs):
    """'asked/trials' and, where some answer was another key, '(n wrong key)'."""
    ok, wrong = sum(r["correct"] for r in rs), sum(r["outcome"] == "wrong key" for r in rs)
    return f"{ok}/{len(rs)}" + (f" ({wrong} wrong key)" if wrong else "")


def distractor_table():
    """Settings x (length, prompt, distractors): the asked key found, of the trials; "= full"
    where a setting reads everything at that length (truncated, or LongHeads with the prompt
    inside chunk_size x max(num_chunks, full_chunks)), so full attention's cell holds (the tests
    prove the equality)."""
    rs = records()
    columns = sorted({(r["length"], prompt(r), len(r["distractors"])) for r in rs},
                     key=lambda c: (c[0], c[1] != "filler, passkey", c[1], c[2]))
    cells = defaultdict(list)
    for r in rs:
        cells[setting(r), (r["length"], prompt(r), len(r["distractors"]))].append(r)
    rows = sorted({setting(r) for r in rs}, key=setting_order)
    head = ["setting"] + [f"{n // 1024}k {p}, {d}" for n, p, d in columns]
    lines = [row_line(head), row_line(["---"] * len(head))]
    for s in rows:
        lines.append(row_line([name(s)] + [cell(cells[s, c]) if cells[s, c] else
                                     "= full" if s != "full" and c[0] <= reads_all_below(s)
                                     else "–" for c in columns]))
    return "\n".join(lines)


def reads_all_below(s):
    """The prompt length up to which a setting reads every token, as full attention does: the
    trained length for truncated, chunk_size x max(num_chunks, full_chunks) for LongHeads
    ("128 × 8 score full 64": 8192)."""
    if s in ("full", "truncated", "window"):
        return FULL_LENGTH
    words = s.split()
    chunks = int(words[words.index("full") + 1]) if "full" in words else int(words[2])
    return int(words[0]) * chunks


def agreement_table(length=FULL_LENGTH):
    """At the trained length, for each setting: the asked key found on the prompts where full
    attention finds it, and the answers equal to full attention's on every prompt."""
    rs = [r for r in records() if r["length"] == length]
    full = {trial_id(r): r for r in rs if r["attention"] == "full"}
    rows = defaultdict(list)
    for r in rs:
        if r["attention"] != "full" and trial_id(r) in full:
            rows[setting(r)].append((r, full[trial_id(r)]))
    lines = [row_line(["setting", "where full finds it", "same answer as full"]),
             row_line(["---"] * 3)]
    for s in sorted(rows, key=setting_order):
        pairs = rows[s]
        where = [r for r, f in pairs if f["correct"]]
        same = sum(first_number(r) == first_number(f) for r, f in pairs)
        lines.append(row_line([name(s), f"{sum(r['correct'] for r in where)}/{len(where)}",
                               f"{same}/{len(pairs)}"]))
    return "\n".join(lines)


def answer_table(length=FULL_LENGTH, haystack="filler", wording="passkey", distractors=1):
    """Which key each setting answers, per asked key: 'a' the asked one, or the depth of the key
    it gave; each document's keys sit at the depths named in the column."""
    rs = [r for r in records() if (r["length"], r["haystack"], r["wording"],
                                   len(r["distractors"])) == (length, haystack, wording,
                                                              distractors)]
    asked = sorted({(r["depth"], tuple(sorted(d["depth"] for d in r["distractors"])))
                    for r in rs})
    head = ["setting"] + [f"asked {d:g} (other {', '.join(f'{o:g}' for o in others)})"
                          for d, others in asked]
    lines = [row_line(head), row_line(["---"] * len(head))]
    by = {(setting(r), r["depth"]): r for r in rs}
    for s in sorted({setting(r) for r in rs}, key=setting_order):
        lines.append(row_line([name(s)] + [answered(by.get((s, d))) for d, _ in asked]))
    return "\n".join(lines)


def binding_table():
    """Per setting and length, over the documents asked more than once (trials whose keys sit at
    the same places ask for different keys of one document): in how many every question got its
    own key (the label was read), and in how many every question got the same key (it was not)."""
    docs = defaultdict(list)
    for r in records():
        if r["distractors"]:
            places = tuple(sorted([r["depth"]] + [d["depth"] for d in r["distractors"]]))
            docs[setting(r), r["length"], prompt(r), places].append(r)
    cells = defaultdict(lambda: [0, 0, 0])  # (setting, length): documents, own key, same key
    for (s, length, *_), rs in docs.items():
        if len(rs) > 1:
            cell = cells[s, length]
            cell[0] += 1
            cell[1] += all(r["correct"] for r in rs)
            cell[2] += len({first_number(r) for r in rs}) == 1
    lines = [row_line(["setting", "length", "documents asked twice or more",
                       "each question its own key", "every question the same key"]),
             row_line(["---"] * 5)]
    for (s, length), (n, own, same) in sorted(cells.items(),
                                              key=lambda c: (c[0][1], setting_order(c[0][0]))):
        lines.append(row_line([name(s), f"{length // 1024}k", str(n), str(own), str(same)]))
    return "\n".join(lines)


def passkey_table(haystack, wording="passkey"):
    """Settings x lengths on the paper's one-key prompt (or its book version): keys found, of the
    trials; "= full" where a setting reads everything at that length."""
    rs = [r for r in records("passkey-*.json")
          if (r["haystack"], r["wording"], len(r["distractors"])) == (haystack, wording, 0)]
    lengths = sorted({r["length"] for r in rs})
    cells = defaultdict(list)
    for r in rs:
        cells[setting(r), r["length"]].append(r)
    lines = [row_line(["setting"] + [f"{n // 1024}k" for n in lengths]),
             row_line(["---"] * (len(lengths) + 1))]
    for s in sorted({setting(r) for r in rs}, key=setting_order):
        lines.append(row_line([name(s)] + [cell(cells[s, n]) if cells[s, n] else
                                           "= full" if s != "full" and n <= reads_all_below(s)
                                           else "–" for n in lengths]))
    return "\n".join(lines)


def perplexity_table():
    """Settings x position buckets: the mean NLL (nats) of the next token, one prefill of the
    book's opening, from perplexity.py's records."""
    rs = records("perplexity-*.json")
    buckets = [f"NLL [{b['start'] // 1024}k, {b['end'] // 1024}k)" for b in rs[0]["buckets"]]
    lines = [row_line(["setting", *buckets, "seconds"]), row_line(["---"] * (len(buckets) + 2))]
    for r in sorted(rs, key=lambda r: setting_order(setting(r))):
        lines.append(row_line([name(setting(r))] + [f"{b['nll']:.3f}" for b in r["buckets"]]
                              + [f"{r['seconds']:.0f}"]))
    return "\n".join(lines)


def commands(pattern):
    """The distinct commands that made the records matching pattern, one per line, in file
    order: what reruns a table (command_line)."""
    return "\n".join(dict.fromkeys(map(command_line, records(pattern))))


def command_line(r):
    """A record's command as it runs from the repository root now; an older one (it wrote
    results/, from the old top level) with the commit it ran at: "...  # (at 0704b15)"."""
    return r["command"] if WRITES in r["command"] else f"{r['command']}  # (at {r['commit']})"


def demo_transcript(file=DEMO):
    """The demo's trial lines and summary, as passkey.py printed them, from its record."""
    import passkey  # torch and all: only the README's block needs it
    rs = json.loads((RESULTS / file).read_text())
    return "\n".join([*map(passkey.trial_line, rs), passkey.summary(rs)])


def demo_minutes(file=DEMO):
    """The demo's trials, in minutes, from its record."""
    return f"{sum(r['seconds'] for r in json.loads((RESULTS / file).read_text())) / 60:.1f}"


def bench(file="bench-cpu.json"):
    return json.loads((RESULTS / file).read_text())


def bench_command(file="bench-cpu.json"):
    """The command that made the benchmark record (command_line)."""
    return command_line(bench(file))


def bench_settings(rs):
    """full first, then the LongHeads settings in the order of their first record."""
    return ["full"] + list(dict.fromkeys(r["setting"] for r in rs if "setting" in r))


def bench_prefill_table(file="bench-cpu.json"):
    """Prefill seconds per length and setting (ratio to full attention), and the working memory
    beyond the loaded model."""
    rs = [r for r in bench(file)["records"] if r["kind"] == "prefill"]
    by = {(r.get("setting", "full"), r["length"]): r for r in rs}
    names = bench_settings(rs)
    lines = [row_line(["tokens"] + [bench_name(s) for s in names]),
             row_line(["---"] * (len(names) + 1))]
    for n in sorted({r["length"] for r in rs}):
        full = by["full", n]["seconds"]
        lines.append(row_line([f"{n // 1024}k"] + [
            f"{by[s, n]['seconds']:.1f} s" + ("" if s == "full" else
                                              f" ({by[s, n]['seconds'] / full:.2f})")
            + f", +{by[s, n]['work_bytes'] / 2**30:.2f} GiB" for s in names]))
    return "\n".join(lines)


def bench_decode_table(file="bench-cpu.json"):
    """Milliseconds per decoded token after each cache length (ratio to full attention)."""
    rs = [r for r in bench(file)["records"] if r["kind"] == "decode"]
    by = {(r.get("setting", "full"), r["length"]): r["ms_per_token"] for r in rs}
    lengths = sorted({r["length"] for r in rs})
    lines = [row_line(["setting"] + [f"after {n // 1024}k" for n in lengths]),
             row_line(["---"] * (len(lengths) + 1))]
    for s in bench_settings(rs):
        lines.append(row_line([bench_name(s)] + [
            f"{by[s, n]:.1f} ms" + ("" if s == "full" else f" ({by[s, n] / by['full', n]:.2f})")
            for n in lengths]))
    return "\n".join(lines)


def bench_attention_table(file="bench-cpu.json"):
    """Attention alone: SDPA (full), the fast path and the short function, seconds and ratios."""
    rs = [r for r in bench(file)["records"] if r["kind"] == "attention"]
    lines = [row_line(["setting", "q, k, v", "SDPA", "tiled", "short", "SDPA / tiled",
                       "short / tiled"]), row_line(["---"] * 7)]
    for r in rs:
        sdpa, tiled, short = r["sdpa_seconds"], r["tiled_seconds"], r["short_seconds"]
        lines.append(row_line([bench_name(r["setting"]), r["attention"], f"{sdpa:.1f} s",
                               f"{tiled:.1f} s", f"{short:.1f} s", f"{sdpa / tiled:.2f}",
                               f"{short / tiled:.2f}"]))
    return "\n".join(lines)


def gpu_plan_table(file="plan-gpu-check-78gib.txt"):
    """The GPU check's plan on paper (a printout of gpu_check.sh --plan): its command, its time
    plan, and each measurement's GPU memory on paper and whether it runs on that card."""
    lines = (RESULTS / file).read_text().splitlines()
    plans = [json.loads(x) for x in lines if x.startswith("{")]
    fit = plans[0]["fit_bytes"] / 1e9
    out = ["```bash", lines[0][2:], "```", "", lines[1] + ".", "",
           row_line(["measurement", "tokens", "on paper", f"runs (under {fit:.1f} GB)"]),
           row_line(["---"] * 4)]
    for r in plans:
        what = " ".join([r["kind"], r["attention"], r.get("setting", "").replace("x", " × ")])
        how = "" if r["kind"] != "prefill" else (
            " whole" if r["piece"] is None else f" in pieces of {r['piece']}")
        runs = "skipped" if r["skip"] else "yes"
        out.append(row_line([what.strip(), f"{r['length'] // 1024}k",
                             f"{r['estimate_bytes'] / 1e9:.1f} GB{how}", runs]))
    return "\n".join(out)


def bench_name(s):
    """bench.py's '256x32' as the tables write settings."""
    return s if s == "full" else name(s.replace("x", " × ") + " position")


def prefill_ratio(setting, length=32768, file="bench-cpu.json"):
    """LongHeads' prefill time over full attention's, from the benchmark record: '0.59×'."""
    by = {(r.get("setting", "full"), r["length"]): r["seconds"]
          for r in bench(file)["records"] if r["kind"] == "prefill"}
    return f"{by[setting, length] / by['full', length]:.2f}×"


def short_over_tiled(attention="text", file="bench-cpu.json"):
    """The short function's time over the fast path's, attention alone, per setting: '4.85×'."""
    rs = [r for r in bench(file)["records"] if r["kind"] == "attention"
          and r["attention"] == attention]
    return " and ".join(f"{r['short_seconds'] / r['tiled_seconds']:.2f}× "
                        f"({bench_name(r['setting'])})" for r in rs)


def answered(r):
    """'asked', the depth of the distractor whose key the answer was, or 'none'."""
    if r is None:
        return "–"
    if r["correct"]:
        return "asked"
    depth = {d["key"]: d["depth"] for d in r["distractors"]}.get(first_number(r))
    return "none" if depth is None else f"key at {depth:g}"


def first_number(r):
    digits = "".join(c if c.isdigit() else " " for c in r["output"]).split()
    return int(digits[0]) if digits else None


def trial_id(r):
    return r["length"], r["haystack"], r["wording"], len(r["distractors"]), r["depth"], r["key"]


def setting_order(s):
    """full, truncated and window first, then LongHeads by budget, then by name."""
    if s in ("full", "truncated", "window"):
        return (0, ("full", "truncated", "window").index(s))
    w, _, k = s.split()[:3]
    return (1, int(w) * int(k), s)  # "128 × 8 ..."


def row_line(cells):
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    for table in (distractor_table, agreement_table, answer_table, binding_table):
        print(table(), end="\n\n")

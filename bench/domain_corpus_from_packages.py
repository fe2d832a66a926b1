"""A three-domain corpus (issue 16) from the installed Python packages: Python sources (`code`),
markdown docs (`docs`) and package long descriptions, i.e. READMEs (`readme`), ~1.5 MB each, cut into
~1500-character documents at blank lines. Writes {"domain", "text"} JSONL for `darkhorse prepare`.

    .venv/bin/python bench/domain_corpus_from_packages.py /tmp/h9/corpus/pkg3.jsonl
"""

import json
import pathlib
import random
import sys
import sysconfig

S = pathlib.Path(sysconfig.get_paths()["purelib"])
random.seed(0)


def chunks(text, size=1500):
    paras, cur = text.split("\n\n"), ""
    for p in paras:
        cur += p + "\n\n"
        if len(cur) >= size:
            yield cur.strip()
            cur = ""
    if len(cur) > 200:
        yield cur.strip()


def collect(files, cap=1_500_000):
    out, total = [], 0
    files = sorted(files)
    random.shuffle(files)
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except Exception:
            continue
        if f.name == "METADATA":  # the long description after the headers
            text = text.split("\n\n", 1)[-1]
        for c in chunks(text):
            out.append(c)
            total += len(c)
            if total > cap:
                return out
    return out


domains = {
    "code": collect(S.glob("**/*.py")),
    "docs": collect(S.glob("**/*.md")),
    "readme": collect(S.glob("*.dist-info/METADATA")),
}
with open(sys.argv[1], "w") as f:
    for name, docs in domains.items():
        print(name, len(docs), sum(map(len, docs)))
        for d in docs:
            f.write(json.dumps({"domain": name, "text": d}) + "\n")

"""A three-domain corpus (issue 16) from the installed Python packages, ~1.5 MB a domain, cut into
~1500-character documents at blank lines. Writes {"domain", "text"} JSONL for `darkhorse prepare`, and
OUT.files.json: the files each domain drew from.

- default (`pkg3`): Python sources (`code`), markdown docs (`docs`) and package long descriptions, i.e.
  READMEs (`readme`). docs vs readme is where a file sits in its package, not what kind of text it is.
- `--kinds` (`kinds3`): three kinds of text: Python sources with their docstrings removed (`code`), those
  sources' docstrings (`docstrings`), and prose documentation: markdown and reST docs and the READMEs
  together (`docs`).

    .venv/bin/python bench/domain_corpus_from_packages.py /tmp/h9/corpus/pkg3.jsonl
    .venv/bin/python bench/domain_corpus_from_packages.py /tmp/d3/kinds3.jsonl --kinds
"""

import argparse
import ast
import json
import pathlib
import random
import sysconfig

S = pathlib.Path(sysconfig.get_paths()["purelib"])
CAP = 1_500_000
DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def chunks(text, size=1500):
    paras, cur = text.split("\n\n"), ""
    for p in paras:
        cur += p + "\n\n"
        if len(cur) >= size:
            yield cur.strip()
            cur = ""
    if len(cur) > 200:
        yield cur.strip()


def read(f):
    """A file's text (a METADATA file's long description after its headers); None if unreadable."""
    try:
        text = f.read_text(encoding="utf-8")
    except Exception:
        return None
    return text.split("\n\n", 1)[-1] if f.name == "METADATA" else text


def shuffled(files):
    files = sorted(files)
    random.shuffle(files)
    return files


def collect(files, used, cap=CAP):
    """Documents from `files` in shuffled order until `cap` characters; the files read go to `used`."""
    out, total = [], 0
    for f in shuffled(files):
        text = read(f)
        if text is None:
            continue
        used.append(str(f.relative_to(S)))
        for c in chunks(text):
            out.append(c)
            total += len(c)
            if total > cap:
                return out
    return out


def split_docstrings(source):
    """(the source without its docstrings, the docstrings) of a Python file; None if it does not parse.
    A body that was only a docstring becomes `pass`, so the code stays Python."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    lines, docs, drop = source.splitlines(), [], {}
    for node in ast.walk(tree):
        if not isinstance(node, DOCSTRING_OWNERS) or not node.body:
            continue
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            docs.append(ast.get_docstring(node))
            alone = len(node.body) == 1 and not isinstance(node, ast.Module)
            drop[first.lineno - 1] = (first.end_lineno, " " * first.col_offset + "pass" if alone else None)
    code, i = [], 0
    while i < len(lines):
        if i in drop:
            end, keep = drop[i]
            if keep:
                code.append(keep)
            i = end
        else:
            code.append(lines[i])
            i += 1
    return "\n".join(code), "\n\n".join(d for d in docs if d.strip())


def collect_kinds(used):
    """The `--kinds` domains: each Python file (shuffled) feeds `code` its docstring-free source and
    `docstrings` its docstrings until each holds CAP characters; docs and READMEs are shuffled together."""
    domains, totals = {"code": [], "docstrings": []}, {"code": 0, "docstrings": 0}
    for f in shuffled(S.glob("**/*.py")):
        text = read(f)
        parts = split_docstrings(text) if text is not None else None
        if parts is None:
            continue
        for name, part in zip(("code", "docstrings"), parts, strict=True):
            if totals[name] > CAP or not part.strip():
                continue
            used[name].append(str(f.relative_to(S)))
            for c in chunks(part):
                domains[name].append(c)
                totals[name] += len(c)
        if min(totals.values()) > CAP:
            break
    prose = [*S.glob("**/*.md"), *S.glob("**/*.rst"), *S.glob("*.dist-info/METADATA")]
    domains["docs"] = collect(prose, used["docs"])
    return domains


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the JSONL to write")
    parser.add_argument("--kinds", action="store_true", help="code / docstrings / docs by kind of text")
    args = parser.parse_args()
    random.seed(0)
    if args.kinds:
        used = {"code": [], "docstrings": [], "docs": []}
        domains = collect_kinds(used)
    else:
        used = {"code": [], "docs": [], "readme": []}
        domains = {
            "code": collect(S.glob("**/*.py"), used["code"]),
            "docs": collect(S.glob("**/*.md"), used["docs"]),
            "readme": collect(S.glob("*.dist-info/METADATA"), used["readme"]),
        }
    with open(args.out, "w") as f:
        for name, docs in domains.items():
            print(name, len(docs), "documents,", sum(map(len, docs)), "characters,", len(used[name]), "files")
            for d in docs:
                f.write(json.dumps({"domain": name, "text": d}) + "\n")
    pathlib.Path(args.out + ".files.json").write_text(json.dumps(used, indent=1))


if __name__ == "__main__":
    main()

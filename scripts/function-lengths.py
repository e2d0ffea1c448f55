#!/usr/bin/env python3
"""Lines per Swift function: every `func`, `init`, `deinit` and `subscript` body (declaration
line to closing brace), found with a small lexer that skips comments and string literals.

usage: scripts/function-lengths.py [--max N] [--top K] PATH...   (folders are searched for *.swift)
Prints the functions over N lines (default 80) and exits 1 if there are any; --top K lists the
K longest instead.
"""
import os
import re
import sys

DECL = re.compile(r"\b(func\s+[^\s(<]+|init[?!]?|deinit|subscript)\s*[(<{]")


def blank_code(src):
    """The source with comments and string literal contents replaced by spaces (newlines kept)."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i)); i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j): depth += 1; j += 2
                elif src.startswith("*/", j): depth -= 1; j += 2
                else: j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j])); i = j
        elif c == '"' or (c == "#" and re.match(r'#+"', src[i:])):
            j = skip_string(src, i)
            out.append(re.sub(r"[^\n]", " ", src[i:j])); i = j
        else:
            out.append(c); i += 1
    return "".join(out)


def skip_string(src, i):
    """Index just past the string literal starting at i (raw #"…"#, multi-line, interpolations)."""
    hashes = 0
    while src[i] == "#": hashes += 1; i += 1
    triple = src.startswith('"""', i)
    close = ('"""' if triple else '"') + "#" * hashes
    j = i + (3 if triple else 1)
    escape = "\\" + "#" * hashes
    while j < len(src):
        if src.startswith(escape + "(", j):          # interpolation: balanced parens, nested strings
            j += len(escape) + 1; depth = 1
            while j < len(src) and depth:
                if src[j] == '"': j = skip_string(src, j); continue
                depth += {"(": 1, ")": -1}.get(src[j], 0); j += 1
        elif src.startswith(escape, j): j += len(escape) + 1
        elif src.startswith(close, j): return j + len(close)
        else: j += 1
    return j


def functions(path):
    src = open(path, encoding="utf-8").read()
    code = blank_code(src)
    line_of = lambda pos: code.count("\n", 0, pos) + 1
    for m in DECL.finditer(code):
        j, depth = m.start(), 0
        # the body's opening brace: the first { at bracket depth 0 after the declaration
        k = m.end() - 1
        while k < len(code):
            ch = code[k]
            if ch in "([": depth += 1
            elif ch in ")]": depth -= 1
            elif ch == "{" and depth == 0: break
            elif ch in "\n;}" and depth == 0 and code[m.start():k].strip().startswith(("func", "init", "subscript")) and ch != "\n":
                k = -1; break   # a protocol requirement without a body
            k += 1
        if k < 0 or k >= len(code): continue
        depth, e = 0, k
        while e < len(code):
            if code[e] == "{": depth += 1
            elif code[e] == "}":
                depth -= 1
                if depth == 0: break
            e += 1
        name = m.group(1).split()[-1]
        yield name, line_of(m.start()), line_of(e) - line_of(m.start()) + 1


def main(argv):
    limit, top, paths = 80, 0, []
    it = iter(argv)
    for a in it:
        if a == "--max": limit = int(next(it))
        elif a == "--top": top = int(next(it))
        else: paths.append(a)
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if f.endswith(".swift")]
        else:
            files.append(p)
    found = [(lines, f"{path}:{line}", name) for path in sorted(files) for name, line, lines in functions(path)]
    found.sort(reverse=True)
    shown = found[:top] if top else [f for f in found if f[0] > limit]
    for lines, where, name in shown:
        print(f"{lines:5d}  {where}  {name}")
    if not top:
        print(f"{len(shown)} function(s) over {limit} lines in {len(files)} files")
    return 1 if shown and not top else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

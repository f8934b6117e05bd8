#!/usr/bin/env python3
"""Checks every relative link in README.md and docs/*.md: the file exists and,
for #anchors into Markdown files, a heading with that GitHub slug exists.
Usage: scripts/check-doc-links.py [REPO_ROOT]  (exit 1 if a link is broken)"""
import re, sys, os, glob
root = sys.argv[1] if len(sys.argv) > 1 else '.'
files = [os.path.join(root, 'README.md')] + sorted(glob.glob(os.path.join(root, 'docs', '*.md')))

def slugs(path):
    out, seen = set(), {}
    in_code = False
    for line in open(path, encoding='utf-8'):
        if line.startswith('```'):
            in_code = not in_code
            continue
        if in_code:
            continue
        m = re.match(r'^(#{1,6})\s+(.*?)\s*#*\s*$', line)
        if not m:
            continue
        text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', m.group(2))
        s = text.strip().lower()
        s = re.sub(r'[^\w\- ]', '', s)
        s = s.replace(' ', '-')
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f'{s}-{n}')
    return out

bad = 0
link_re = re.compile(r'(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
for f in files:
    in_code = False
    for no, line in enumerate(open(f, encoding='utf-8'), 1):
        if line.lstrip().startswith('```'):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in link_re.findall(line):
            if re.match(r'^[a-z]+:', target) or target.startswith('//'):
                continue
            path, _, anchor = target.partition('#')
            dest = os.path.normpath(os.path.join(os.path.dirname(f), path)) if path else f
            if not os.path.exists(dest):
                print(f'{f}:{no}: missing file: {target}'); bad += 1; continue
            if anchor and dest.endswith('.md') and anchor not in slugs(dest):
                print(f'{f}:{no}: missing anchor: {target}'); bad += 1
print(f'{len(files)} files checked, {bad} broken links')
sys.exit(1 if bad else 0)

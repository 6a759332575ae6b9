#!/usr/bin/env bash
# Builds the real-text corpus of the PSA quality benchmark (bench/bench_psa.cpp
# --quality) here, where Debian's archive is reachable, as token shards the GPU
# machine gets through `carry` (.gpu-data/ is git-ignored):
#   the GNU Collaborative International Dictionary of English (Debian's
#   dict-gcide: Webster's 1913 plus additions, GPL, ~40 MB of English), taken
#   out of its dictd container, tokenised with the GPT-2 tokenizer fixture,
#   one document per entry (blank-line-separated paragraphs).
# Usage: scripts/make-psa-corpus.sh [BUILD_DIR]   (needs a built `unswag`)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=.gpu-data/gcide
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download dict-gcide >/dev/null && dpkg -x dict-gcide_*.deb pkg)
mkdir -p "$out"
# dictd's own entries (00-database-*) come first; the dictionary starts at its first headword.
# The text is ASCII apart from 3 stray cp1252 bytes, which iconv drops (-c).
zcat "$work"/pkg/usr/share/dictd/gcide.dict.dz | awk 'p || /^A \\/{p=1} p' | iconv -c -f UTF-8 -t UTF-8 \
  > "$work/gcide.txt"
# Validation: every 40th entry (2.5%, spread over the alphabet); training: the rest.
awk -v RS= -v ORS='\n\n' -v out="$work" '{ print > (NR % 40 == 0 ? out "/val.txt" : out "/train.txt") }' \
  "$work/gcide.txt"
for split in train val; do
  "$build/unswag" tokenize "$work/$split.txt" --tokenizer tests/fixtures/tokenizers/gpt2 --out "$out/$split" \
    --paragraphs --overwrite
done
du -sh "$out"

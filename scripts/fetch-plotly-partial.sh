#!/usr/bin/env bash
# Fetch plotly.js's "cartesian" partial bundle (scatter, heatmap, ...: every trace the report draws) from the npm
# registry with npm itself, at the plotly.js version the installed Python plotly bundles, into
# parity/report/vendor/ (git-ignored). report.html then inlines it gzip+base64 (~0.66 MB instead of 4.8 MB).
# Without it the report inlines the full plotly.js, also gzip+base64 (~1.9 MB): it still works offline.
# Usage: scripts/fetch-plotly-partial.sh [PYTHON]   (idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
DEST=parity/report/vendor
version=$("$PY" -c 'import re, plotly.offline as o; print(re.search(r"plotly\.js v([0-9.]+)", o.get_plotlyjs()[:400]).group(1))')
if [ -f "$DEST/plotly-cartesian.min.js" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$version" ]; then
    echo "plotly.js cartesian bundle $version: present"; exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "fetch-plotly-partial.sh: npm not found; the report will inline the full plotly.js (~1.9 MB)" >&2; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "plotly.js-cartesian-dist-min@$version" >/dev/null)
tar -xzf "$tmp"/plotly.js-cartesian-dist-min-"$version".tgz -C "$tmp"
mkdir -p "$DEST"
cp "$tmp/package/plotly-cartesian.min.js" "$DEST/plotly-cartesian.min.js.tmp"
cp "$tmp/package/LICENSE" "$DEST/LICENSE"
mv "$DEST/plotly-cartesian.min.js.tmp" "$DEST/plotly-cartesian.min.js"
echo "$version" > "$DEST/VERSION"
echo "plotly.js cartesian bundle $version: fetched into $DEST"

#!/usr/bin/env bash
# Sets canopy up and runs it: installs missing packages, builds Release, fetches and converts the
# default model (SmolLM2-135M-Instruct), then generates a reply. With arguments it is the CLI:
#   ./run.sh generate --chat -p "Why is the sky blue?"
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
source "$root/tools/install_deps.sh"

canopy_install_debs
canopy_build "$root" "$root/build" -DCMAKE_BUILD_TYPE=Release >&2
py="$(canopy_python "$root")"
"$py" "$root/tools/convert_smollm2.py" --out "$root/models/SmolLM2-135M-Instruct" >&2

export CANOPY_MODEL="${CANOPY_MODEL:-$root/models/SmolLM2-135M-Instruct}"
if [ $# -eq 0 ]; then
  # The distilled draft shipped in drafts/ (issue 4), with the static tree that decoded fastest
  # on the dev prompts (drafts/SmolLM2-135M-draft/MODEL_CARD.md); --compare also times the
  # target alone.
  draft="$root/drafts/SmolLM2-135M-draft"
  set -- generate --chat -n 128 -d "$draft" --tree "$draft/tree.json" --compare \
    -p "Explain in three sentences why the sky is blue."
fi
exec "$root/build/canopy" "$@"

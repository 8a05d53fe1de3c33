#!/usr/bin/env bash
# Run timm's own tests/test_models.py against every registered timm-exits model (*mexit*, *liferegress*).
#
#   scripts/run_timm_model_tests.sh PATH_TO_PYTORCH_IMAGE_MODELS_CHECKOUT [extra pytest args, e.g. -x]
#
# MODELS="test_vit or named_tiny" narrows the run to models matching that -k expression. Default: the package's own
# named and tiny models, one ViT twin per kind of parent (registers, no [CLS], LayerScale, distilled, rotary cat /
# mixed) and five feature-map twins (MAPS); MODELS="mexit or liferegress" runs every twin (about 1,300 timm
# architectures, many hours on a CPU).
#
# The plugin is loaded with `-p timm_exits` (importing it registers the models). Only the tests that download
# weights are deselected: test_model_inference (timm's reference outputs of test_* models), test_model_load_pretrained
# and test_model_features_pretrained. Run from the repository root; a checkout whose tag matches the installed timm.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1/tests/test_models.py" ]; then
    echo "usage: $0 PATH_TO_PYTORCH_IMAGE_MODELS_CHECKOUT [pytest args]" >&2
    exit 2
fi
TIMM_SRC=$(cd "$1" && pwd)
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
KINDS="vit_small_patch14_reg4_dinov2 or vit_base_patch16_siglip_224 or deit3_small_patch16_224 or deit_tiny_distilled or eva02_tiny_patch14_224 or vit_base_patch16_rope_mixed_224"
# feature-map twins, matched exactly ("-name]" ends the test id): a CNN, an EfficientNet and a MobileNetV3 (their
# features_only is a class of its own), a ConvNeXt and a token (NLC) parent
MAPS="-resnet18_mexit] or -efficientnet_b0_mexit] or -mobilenetv3_small_050_mexit] or -convnext_atto_mexit] or -levit_128s_mexit]"
DEFAULT="test_vit or named_tiny or vit_b16_mexit or _patch16_224_mexit or deit_tiny_liferegress or $KINDS or $MAPS"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 exec python -m pytest -p timm_exits -p no:cacheprovider \
    "$TIMM_SRC/tests/test_models.py" --rootdir "$TIMM_SRC" \
    -k "(mexit or liferegress) and (${MODELS:-$DEFAULT}) and not test_model_inference and not test_model_load_pretrained and not test_model_features_pretrained" \
    -q "$@"

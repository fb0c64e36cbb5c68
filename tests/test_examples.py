import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_drop_in_custom_vit_matches_key_masked_original():
    namespace = runpy.run_path(str(EXAMPLES / "drop_in_custom_vit.py"))
    assert namespace["main"]() < 1e-5


def test_drop_in_conversion_is_under_30_lines():
    text = (EXAMPLES / "drop_in_custom_vit.py").read_text()
    conversion = text.split("# --- the conversion")[1].split("# -----")[0]
    code = [line for line in conversion.splitlines()[1:] if line.strip()]
    assert len(code) < 30

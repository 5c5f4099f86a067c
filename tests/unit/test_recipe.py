"""`grpo sft` refuses a bad data row, naming its line, before anything starts (the
recipe's stages end to end are in tests/e2e/test_recipe.py)."""
import subprocess

from tests.helpers import grpo


def test_a_bad_sft_row_names_its_line(tiny_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2="}\n')
    proc = subprocess.run(grpo("sft", "--data", str(data), "--model", str(tiny_model), "--output", str(tmp_path / "o")),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{data}:2: missing or empty required field 'completion'" in proc.stdout + proc.stderr

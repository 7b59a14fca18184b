"""The README's Python example runs (on the tiny model instead of the bundled one, for speed)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_two_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [ln for ln in first_block.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 2
    assert commands[0].startswith("bash scripts/setup.sh && .venv/bin/neurontune finetune")
    assert commands[1].split("#")[0].strip() == ".venv/bin/python -m pytest -q"
    ci = (README.parent / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q" in ci


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    from neurontune.methods.base import _REGISTRY

    monkeypatch.setattr(
        "neurontune.methods.base._REGISTRY", dict(_REGISTRY)
    )  # the example registers a method
    for code in blocks:
        exec(compile(code.replace('"smollm2-135m"', '"tiny-llama"'), "README.md", "exec"), {})
    assert (tmp_path / "my-adapter" / "neurontune_adapter.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()
    assert (tmp_path / "sft-adapter" / "adapter_model.safetensors").is_file()  # the PEFT method's
    assert "ROWTUNE" in (tmp_path / "sft-adapter" / "adapter_config.json").read_text()
    assert "trainable params:" in capsys.readouterr().out

"""What a newcomer meets first: `lorakit --version`, the LICENSE, a typo in a LoraConfig keyword."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import lorakit
from lorakit.cli import main
from lorakit.errors import ConfigError, ConfigKeyError

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorakit {version('lorakit')}"
    assert version("lorakit") == lorakit.__version__


def test_version_flag_from_the_shell():
    done = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"lorakit {lorakit.__version__}"


def test_license_is_the_apache_2_text_pyproject_names():
    text = (ROOT / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 200


@pytest.mark.parametrize("typo, meant", [("rr", "r"), ("lora_aplha", "lora_alpha"), ("target_module", "target_modules"),
                                         ("use_rs_lora", "use_rslora")])
def test_a_typo_in_a_loraconfig_keyword_names_the_closest_field(typo, meant):
    with pytest.raises(ConfigKeyError) as info:
        lorakit.LoraConfig(target_modules=["q_proj"], **{typo: 1})
    assert f"LoraConfig got an unknown keyword {typo!r} (did you mean {meant!r}?)" in str(info.value)
    # a ConfigError, and still the TypeError Python raises for an unexpected keyword
    assert isinstance(info.value, ConfigError) and isinstance(info.value, TypeError)


def test_variant_configs_and_replace_check_keywords_too():
    from lorakit.core.variants import AdaLoraConfig

    with pytest.raises(TypeError, match=r"AdaLoraConfig got an unknown keyword 'total_steps' \(did you mean 'total_step'"):
        AdaLoraConfig(target_modules=["q_proj"], total_steps=10)
    cfg = lorakit.LoraConfig(target_modules=["q_proj"])
    with pytest.raises(ConfigKeyError, match="did you mean 'lora_dropout'"):
        cfg.replace(lora_droput=0.1)
    assert cfg.replace(r=4).r == 4
    with pytest.raises(ConfigKeyError, match=r"unknown keyword 'zzz'; its fields are: r, lora_alpha"):
        lorakit.LoraConfig(zzz=1)  # nothing close: no guess

"""The commands of docs/comparisons.sh (the runs behind docs/results.md) are valid configs.

Reported defect: its plain-QAT CMT-KD baseline switched the quickstart's activation
quantizer to HWGQ but kept the quickstart's PACT clip init, a combination the config
check refuses, so the script printed ``FAILED cm_qat`` and went on.
"""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from qflax import cli, train
from qflax.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "docs", "comparisons.sh")


def _commands(what: str, tmp_path) -> list[list[str]]:
  """The ``python launch.py`` command lines the script runs for ``what``, recorded by a stand-in ``python``."""
  bin_dir, record = tmp_path / "bin", tmp_path / "commands.txt"
  bin_dir.mkdir()
  stand_in = bin_dir / "python"
  stand_in.write_text(f'#!/bin/bash\nprintf "%s\\n" "$(printf "%q " "$@")" >> {shlex.quote(str(record))}\n')
  stand_in.chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CMP_OUT": str(tmp_path / "out")}
  done = subprocess.run(["bash", SCRIPT, what, "--config.seed=1"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=60)
  assert done.returncode == 0 and "FAILED" not in done.stdout, done.stdout + done.stderr
  return [shlex.split(line) for line in record.read_text().splitlines()]


@pytest.mark.parametrize("what,runs", [("aao", 5), ("qkd", 4), ("progressive", 11), ("cmtkd", 6)])
def test_every_comparison_command_is_a_valid_config(what, runs, tmp_path):
  commands = _commands(what, tmp_path)
  assert len(commands) == runs
  for argv in commands:
    assert argv[0] == "launch.py"
    args, overrides = cli.parse(argv[1:])
    config = cli.resolve_config(args.config)
    config = config_lib.load_config_file(config)
    cli.apply_overrides(config, overrides)
    settings = config_lib.load(config)     # raises ConfigError naming the field
    assert settings.run.seed == 1


def test_a_stale_activation_parameter_is_refused_with_the_way_out():
  config = config_lib.load_config_file(cli.resolve_config("quickstart"))
  cli.apply_overrides(config, [("quant.act_quantizer", "hwgq")])
  with pytest.raises(train.ConfigError, match=r"not 'alpha' .*--config\.quant\.act_param_init='\{\}'"):
    config_lib.load(config)
  cli.apply_overrides(config, [("quant.act_param_init", "{}")])
  assert config_lib.load(config).run.quant.act_quantizer == "hwgq"

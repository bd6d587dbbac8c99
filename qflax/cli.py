"""The command line: ``qflax-train`` (installed) and ``python launch.py`` (a clone).

  qflax-train --config aao_cifar100 --workdir runs/aao --config.num_epochs=10
  qflax-train --config configs/quickstart.py --config.bits='(32,2)'
  qflax-train --list                      # methods, models, datasets and every config field

``--config`` is a config file or the name of a shipped recipe (``qflax/configs``);
``--config.<field>=<value>`` overrides a field (values are Python literals, or plain
strings). Every mistake ends in one line naming the cause (exit code 2), before any
compute, and leaves the workdir as it was.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

EXIT_USAGE = 2
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class UsageError(Exception):
  """A command-line mistake; the message is the one line shown."""


def recipe_names() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


def resolve_config(name: str) -> str:
  """A config file path, or a shipped recipe's name (``aao_cifar100`` or ``aao_cifar100.py``)."""
  if os.path.isfile(name):
    return name
  shipped = os.path.join(CONFIG_DIR, os.path.basename(name) if name.endswith(".py") else name + ".py")
  if os.path.dirname(name) in ("", "configs") and os.path.isfile(shipped):
    return shipped
  raise UsageError(f"config {name!r} is neither a file nor a shipped recipe; recipes: {', '.join(recipe_names())}")


class _NonFiniteNames(ast.NodeTransformer):
  """``nan`` and ``inf`` as floats, so a field's own check can refuse them by name."""

  def visit_Name(self, node):
    return ast.Constant(float(node.id)) if node.id in ("nan", "inf") else node


def _literal(text: str):
  try:
    return ast.literal_eval(_NonFiniteNames().visit(ast.parse(text.strip(), mode="eval")))
  except (ValueError, SyntaxError, TypeError):
    return text


def apply_overrides(config, overrides: list[tuple[str, str]]):
  """Sets ``field=value`` pairs on ``config`` (a ConfigDict); an unknown field, or a
  value of the wrong type, raises :class:`UsageError` (with "did you mean")."""
  import ml_collections

  from qflax import methods, options
  for path, text in overrides:
    *parents, leaf = path.split(".")
    node = config
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise UsageError(options.unknown_fields_message(".".join(parents[:i]), [part], known))
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict):
      raise UsageError(f"config field {'.'.join(parents)} is a value, not a section: --config.{path} has no field "
                       "to set")
    value = text if isinstance(node.get(leaf), str) else _literal(text)
    if leaf not in node and not _may_add(node, parents, leaf, config):
      known = list(node.keys())
      if parents == ["method"]:
        known += [f.name for f in methods.get_method(config.method.name).Options.declared()]
      raise UsageError(options.unknown_fields_message(".".join(parents), [leaf], sorted(set(known))))
    expected = _KINDS.get(type(node.get(leaf)).__name__)
    try:
      if isinstance(value, bool) and node.get(leaf) is not None and not isinstance(node.get(leaf), bool):
        raise TypeError("ml_collections would take True as 1.0")
      with node.unlocked() if hasattr(node, "unlocked") else _nothing():
        node[leaf] = value
    except (TypeError, ValueError) as e:
      why = f"{expected} is expected" if expected else str(e).splitlines()[0]
      raise UsageError(f"config field {path}={text} is invalid: {why}") from None


_KINDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string", "tuple": "a tuple",
          "list": "a list", "dict": "a dict", "ConfigDict": "a dict"}


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _may_add(node, parents, leaf, config) -> bool:
  """A field the config file did not set but its section declares: a method option,
  or a model option (free-form, checked when the model is built)."""
  from qflax import methods
  if parents == ["method"] and config.method.name in methods.method_names():
    return leaf in {f.name for f in methods.get_method(config.method.name).Options.declared()}
  return parents[:2] == ["model", "options"] or parents[-1:] == ["act_param_init"]


def describe() -> str:
  """What ``--list`` prints."""
  from qflax import data, methods, models
  from qflax.train import config as config_lib
  lines = [f"methods:  {', '.join(methods.method_names())}", f"models:   {', '.join(models.model_names())}",
           f"datasets: {', '.join(data.dataset_names())}", f"recipes:  {', '.join(recipe_names())}", "",
           "config fields (default) [allowed]:"]
  for field, default, doc in config_lib.describe():
    lines.append(f"  {field} = {default}  {doc}")
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="qflax-train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=None, help="config file or shipped recipe name (default: quickstart; "
                      "training only: evaluate and export read the run's own config)")
  parser.add_argument("--workdir", default=None, help="where checkpoints, logs and results go "
                      "(default: runs/<config name>)")
  parser.add_argument("--mode", default="train", choices=("train", "evaluate", "export"),
                      help="train (resumes), evaluate every variant of --workdir, or export it")
  parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
  parser.add_argument("--list", action="store_true", help="list methods, models, datasets and config fields")
  return parser


def parse(argv: list[str]):
  """``(arguments, overrides)``; ``--config.a.b=v`` (or ``--config.a.b v``) pairs are the overrides."""
  overrides, rest, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise UsageError(f"{arg} needs a value (--config.{key}=VALUE)")
        value, i = argv[i + 1], i + 1
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  parser = _parser()
  args, unknown = parser.parse_known_args(rest)
  if unknown:
    raise UsageError(f"unexpected arguments {unknown}; see --help")
  _check_usage(args, overrides)
  args.config = "quickstart" if args.config is None else args.config
  return args, overrides


def _check_usage(args, overrides):
  """Refuses what a mode would silently ignore."""
  if args.list and (overrides or args.config or args.workdir):
    raise UsageError("--list takes no --config, --workdir or --config.* overrides")
  for flag in ("config", "workdir"):
    if getattr(args, flag) == "":
      raise UsageError(f"--{flag} is empty")
  if args.mode != "train" and args.config is not None:
    raise UsageError(f"--mode={args.mode} reads the run's own config from --workdir; leave out --config")
  if args.mode == "export" and overrides:
    raise UsageError(f"--mode=export takes no --config.* overrides, not {[k for k, _ in overrides]}")
  if args.mode == "evaluate" and (bad := [k for k, _ in overrides if not k.startswith("dataset.")]):
    raise UsageError(f"--mode=evaluate takes only --config.dataset.* overrides, not {bad}")


def _workdir(args, must_exist: bool = False) -> str:
  if must_exist and not args.workdir:
    raise UsageError(f"--mode={args.mode} needs --workdir (a run's directory)")
  workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UsageError(f"--workdir {workdir}: {existing} is a file, not a directory")
  if must_exist and not os.path.isdir(workdir):
    raise UsageError(f"--workdir {workdir} does not exist")
  return workdir


def _after_training(mode: str, workdir: str, overrides) -> int:
  """``evaluate``: every variant of the run (``--config.dataset.*`` overrides choose
  another dataset) into ``<workdir>/evaluation.json``; ``export``: ``<workdir>/export/``."""
  import json

  from qflax.train import config as config_lib
  from qflax.train import saved
  run = saved.load(workdir)
  if mode == "export":
    manifest = saved.export(run)
    print(f"exported {', '.join(manifest['files'])} and {manifest['stablehlo']['file']} to {workdir}/export")
    return 0
  apply_overrides(run.config, overrides)
  dataset = config_lib.load(run.config).loop.dataset
  accuracies = saved.evaluate(run, dataset)
  with open(os.path.join(workdir, "evaluation.json"), "w") as f:
    json.dump({"step": run.step, "dataset": dataset.name, "accuracy": accuracies}, f, indent=2)
  print("evaluation: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in accuracies.items()))
  return 0


# What Orbax logs, with a traceback each, when a background checkpoint write fails (hundreds
# of lines on a full disk).
_ORBAX_WRITE_FAILURES = ("_SignalingThread.run() raised an exception", "in background save thread",
                         "Save Finalize thread")
_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}checkpoint{os.sep}"


def _no_orbax_write_failures(record) -> bool:
  return not (record.levelno >= 40 and _ORBAX_SOURCE in record.pathname
              and any(text in record.getMessage() for text in _ORBAX_WRITE_FAILURES))


def _no_unretrieved_orbax_failures(record) -> bool:
  """asyncio logs every task of a failed write whose error nobody awaited ("Task exception
  was never retrieved"), when the task is collected: one traceback per array. Only write
  failures (an OSError, or TensorStore's "Error writing") raised through Orbax are dropped."""
  _, error, traceback = record.exc_info or (None, None, None)
  frames = []
  while traceback is not None:
    frames.append(traceback.tb_frame.f_code.co_filename)
    traceback = traceback.tb_next
  write_failure = isinstance(error, OSError) or "Error writing" in str(error)
  return not (record.levelno >= 40 and "exception was never retrieved" in record.getMessage() and write_failure
              and any(_ORBAX_SOURCE in frame for frame in frames))


def _no_closed_loop_callbacks(unraisable):
  """After a failed write, TensorStore still completes the write's pending futures into
  the event loop Orbax has closed; each prints "Event loop is closed" (dozens at once)."""
  if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
    sys.__unraisablehook__(unraisable)


def _quiet_failed_checkpoint_writes():
  """Keeps what Orbax, asyncio and TensorStore print about a failed checkpoint write off the
  console: the checkpoint's save or wait reports the failure in one line."""
  import logging as std_logging

  from absl import logging
  logging.get_absl_logger().addFilter(_no_orbax_write_failures)
  std_logging.getLogger("asyncio").addFilter(_no_unretrieved_orbax_failures)
  sys.unraisablehook = _no_closed_loop_callbacks


def run(argv: list[str]) -> int:
  """The command; returns the exit code."""
  from absl import logging
  args, overrides = parse(argv)
  if args.list:
    print(describe())
    return 0
  logging.set_verbosity(logging.WARNING)   # keep Orbax's per-save INFO lines off the console
  from qflax.train.devices import configure_cpu_thread_pools
  configure_cpu_thread_pools()             # before the CPU backend starts: fake devices need room
  if args.distributed:
    import jax
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:   # e.g. no coordinator address on a single host
      cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UsageError(f"--distributed: jax.distributed.initialize() failed: {cause}") from None
  from qflax import data, train
  reported = (train.ConfigError, data.DataUnavailableError, data.IdxFormatError, train.CheckpointError,
              train.NonFiniteLossError)
  workdir = _workdir(args, must_exist=args.mode != "train")
  try:
    if args.mode != "train":
      return _after_training(args.mode, workdir, overrides)
    _quiet_failed_checkpoint_writes()
    train.train_and_evaluate(_training_config(args, overrides), workdir)
  except train.TrainingInterrupted as e:
    print(str(e), file=sys.stderr)
    return 128 + e.signum
  except reported as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except OSError as e:       # a full disk or a lost mount (the checkpoints say so themselves)
    kept = "; the checkpoints written so far are kept" if args.mode == "train" else ""
    print(f"error: {e.strerror or e} ({e.filename or 'in ' + workdir}){kept}", file=sys.stderr)
    return EXIT_USAGE
  return 0


def _training_config(args, overrides):
  from qflax import train
  config = train.load_config_file(resolve_config(args.config))
  apply_overrides(config, overrides)
  if args.distributed:
    with config.unlocked() if hasattr(config, "unlocked") else _nothing():
      config.distributed = True
  return config


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  try:
    code = run(argv)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    code = EXIT_USAGE
  sys.exit(code)

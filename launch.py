"""Train, evaluate and checkpoint a qflax method (the same command as ``qflax-train``).

  python launch.py --config configs/aao_cifar100.py --workdir runs/aao
  python launch.py --config configs/quickstart.py --config.num_epochs=1
  python launch.py --list

Without ``--config`` it runs the quickstart (``configs/quickstart.py``). Re-running
the same command resumes from the workdir's latest checkpoint.
"""

from qflax.cli import main

if __name__ == "__main__":
  main()

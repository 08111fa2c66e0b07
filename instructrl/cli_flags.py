"""One place for the absl flags of the command-line modules (main, plan, rm_cv, sweep, best_of_n).

Several of them end up imported into one process (a test worker imports `main` for its config
checks and `sweep` for its planner), and absl refuses a flag defined twice. `define` returns the
flag that is already there (same name, same meaning in every module: --config, --workdir, ...),
which has the `.value` and `.present` a FlagHolder has.
"""

from absl import flags


def define(definer, name: str, *args, **kwargs):
  if name in flags.FLAGS:
    return flags.FLAGS[name]
  return definer(name, *args, **kwargs)

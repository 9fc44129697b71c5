"""minivit gradcheck: every hand-written backward against central finite differences."""

import time

from minivit import backend
from minivit.commands.common import apply_backend, command_parser, number
from minivit.inspect.opchecks import OP_CHECKS, get_check, run_check

EPILOG = """Each op gets random inputs and a random upstream gradient (float64, drawn from --seed);
its analytic vector-Jacobian product is compared with central differences of <v, f(x)>,
element by element for small inputs and along random directions for the whole ViT. An input
passes when its relative error is at most --rtol (or its absolute error is below the
differences' own round-off). The exit status is 1 when any check fails.

examples:
  minivit gradcheck                      every op and a small ViT
  minivit gradcheck --op layer_norm      one op
  minivit gradcheck --list               the names of the checks
  minivit gradcheck --backend cupy       the same checks on the GPU
"""


def add_parser(subparsers, name, help_text):
    p = command_parser(subparsers, name, help_text, EPILOG)
    p.add_argument("--op", action="append", metavar="NAME",
                   help="check only this op (repeat for several; --list shows the names)")
    p.add_argument("--seed", type=number(int, 0), default=0,
                   help="seed of the random inputs and upstream gradients (default 0)")
    p.add_argument("--rtol", type=number(float, 0.0, inclusive=False), default=1e-6,
                   help="largest relative error that passes (default 1e-6)")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="array backend: numpy (CPU) or cupy (NVIDIA GPU); default: "
                        "$MINIVIT_BACKEND or numpy")


def run(args):
    if args.list:
        width = max(map(len, OP_CHECKS))
        for name, check in OP_CHECKS.items():
            print(f"{name:<{width}}  {check.description}")
        return 0
    checks = [get_check(name) for name in args.op] if args.op else list(OP_CHECKS.values())
    name = apply_backend(args)
    print(f"gradcheck on {name}, float64, seed {args.seed}, rtol {args.rtol:g}")
    header = (f"{'op':<28} {'input':<27} {'shape':<16} {'mode':<11} {'max abs err':>11} "
              f"{'max rel err':>11}  result")
    print(header)
    print("-" * len(header))
    failed, rows, any_floor, start = [], 0, False, time.perf_counter()
    for check in checks:
        report = run_check(check, seed=args.seed, rtol=args.rtol)
        for item in report.inputs:
            print(f"{check.name:<28} {item.name:<27} {_shape(item.shape):<16} {item.mode:<11} "
                  f"{item.max_abs_error:11.2e} {item.max_rel_error:11.2e}  {item.verdict}",
                  flush=True)
            rows += 1
            any_floor = any_floor or item.verdict == "pass (atol)"
        if not report.passed:
            failed.append(check.name)
    elapsed = time.perf_counter() - start
    if failed:
        print(f"\nFAILED: {len(failed)} of {len(checks)} checks ({', '.join(failed)}); "
              f"{elapsed:.1f} s")
        return 1
    print(f"\nall {len(checks)} checks passed ({rows} inputs) in {elapsed:.1f} s")
    if any_floor:
        print("pass (atol): relative error above rtol, but absolute error under the round-off\n"
              "floor of the finite differences, max(1e-10, 1e-8·Σ|f|)")
    return 0


def _shape(shape):
    return "x".join(map(str, shape)) or "scalar"

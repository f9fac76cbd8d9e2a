"""What the lab's scripts share: the command and the commit a record names, one-line errors, the
checks of --device and --offload."""
import sys

import torch

from passkey import UsageError, commit


def command(module, argv=None):
    """The command line that ran `module` (lab.needles, ...), as typed at the repository root."""
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])


def made_by(module, argv=None):
    """The fields every record has: the command that made it and the commit it ran at."""
    return dict(command=command(module, argv), commit=commit())


def printout_head(module, argv=None):
    """A printout's first line, the record of a run that prints rather than writes: the command,
    as a shell shows it, and the commit."""
    return f"$ {command(module, argv)}  # (at {commit()})"


def check_model_args(args):
    """--device, --offload, --chunk-size and --num-chunks, before a model is loaded."""
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UsageError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.num_chunks is not None and args.num_chunks < 3:
        raise UsageError(f"--num-chunks must be >= 3, got {args.num_chunks}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if args.offload and not args.device.startswith("cuda"):
        raise UsageError("--offload moves LongHeads' cache from a GPU to CPU memory: it needs "
                         "--device cuda")


def run_main(name, fn, args, interrupted="--json holds what finished so far"):
    """fn(args), with bad input as one line on stderr and exit code 2, ^C as exit code 130."""
    try:
        return fn(args)
    except (UsageError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted ({interrupted})", file=sys.stderr)
        sys.exit(130)

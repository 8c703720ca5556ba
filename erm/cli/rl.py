"""`erm rl`: the RL loop of `erm.rl` from the command line: the model options, then one flag per
other `RLConfig` field (its help from the field's metadata)."""
import argparse
import dataclasses
import json
import typing
import warnings

from .options import MODEL_OPTIONS, CLIError, check_model_options, model_options, warn


def _config_fields():
    """(the RLConfig fields that are model options, the other fields)."""
    from ..rl import RLConfig
    fields = dataclasses.fields(RLConfig)
    return ([f for f in fields if f.name in MODEL_OPTIONS],
            [f for f in fields if f.name not in MODEL_OPTIONS])


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per RLConfig field that is not a model option."""
    from ..rl import RLConfig
    hints = typing.get_type_hints(RLConfig)
    g = p.add_argument_group("RL")
    for f in _config_fields()[1]:
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        h = f.metadata.get("help", "")
        if base is bool:
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=f.default, help=h)
        else:
            g.add_argument(flag, dest=f.name, type=base, default=f.default,
                           help=f"{h} (default: {f.default})", choices=f.metadata.get("choices"))


def config_from_args(args):
    """The `erm.rl.RLConfig` of parsed `erm rl` arguments (a model option not given keeps the
    field's default)."""
    from ..rl import RLConfig
    shared, other = _config_fields()
    kwargs = {f.name: getattr(args, f.name) for f in other}
    kwargs.update({f.name: getattr(args, f.name) for f in shared
                   if getattr(args, f.name, None) is not None})
    return RLConfig(**kwargs)


def _run(args, rm=None) -> int:
    """`erm rl`: train and print a one-line JSON summary. With `rm` (an `erm.EndoRM`, as
    `erm.cli.main(argv, rm=...)` passes it) the policy starts from a copy of its model."""
    import copy

    from ..rl import NonFiniteTraining, RLWarning, Trainer
    check_model_options(args)
    cfg = config_from_args(args)   # every option checked before anything loads
    model = tok = None
    if rm is not None:
        model, tok = copy.deepcopy(rm.causal_lm), rm.tokenizer
    with warnings.catch_warnings():   # the loop's own warnings as "erm: warning: ..." lines
        default = warnings.showwarning

        def show(message, category, *rest, **kw):
            if issubclass(category, RLWarning):
                return warn(str(message))
            return default(message, category, *rest, **kw)
        warnings.showwarning = show
        trainer = Trainer(cfg, model, tok)
        try:
            summary = trainer.train()
        except NonFiniteTraining as exc:
            raise CLIError(str(exc)) from None
    if trainer.rank != 0:
        return 0
    last = summary["steps"][-1] if summary["steps"] else {}
    print(json.dumps({"accuracy_before": summary.get("accuracy_before"),
                      "accuracy_after": summary.get("accuracy_after"),
                      "final_reward": last.get("reward"), "final_kl": last.get("kl"),
                      "out": str(cfg.out)}))
    return 0


def add_parser(sub) -> None:
    """Register `erm rl` on an argparse subparsers object."""
    from .. import rl
    p = sub.add_parser("rl", help="RL fine-tuning on endogenous rewards (erm.rl)",
                       description=rl.__doc__.split("\n\n")[0])
    model_options(p, [f.name for f in _config_fields()[0]])
    _add_config_options(p)
    p.set_defaults(func=_run)

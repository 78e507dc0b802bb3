"""Run a `torch.export` core-ATen graph with JAX.

`lower(exported_program)` checks every node against the op table once, at
conversion, and turns the program's signature into a `Program`: which graph
inputs are parameters, buffers (by torch name), constants or user inputs, and
which outputs are buffer updates. `run(program, params, buffers, inputs)` then
evaluates the graph node by node with JAX; it is pure and jit-traceable, shapes
are static per trace and symbolic sizes (the dynamic batch) are plain ints read
off the traced arrays.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from torch2flax.errors import ConfigError
from torch2flax.export import layout, ops

Array = jax.Array


class UnsupportedOpError(ConfigError, NotImplementedError):
    """A graph node whose op has no entry in the op table (raised at conversion). A user error: the
    model the user chose is one torch2flax cannot run (yet); another model converts."""


class GraphError(RuntimeError):
    """An op failed while the graph was traced; names the node and its Python source."""


def source_line(node: torch.fx.Node) -> str:
    """The innermost model-code frame of a node's `stack_trace` ('file:line in fn: code')."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not frames:
        return "unknown source"
    # The last frame is often torch.nn.functional; the model's own line is the last non-torch one.
    ours = [f for f in frames if "/torch/" not in f[0]] or frames
    path, line, fn, code = ours[-1]
    return f"{path}:{line} in {fn}: {code.strip()}"


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


@dataclasses.dataclass(frozen=True)
class Step:
    """One `call_function` node with its op and the schema-bound argument template."""

    node: torch.fx.Node
    fn: Any
    args: tuple[Any, ...]
    index: int
    channels_last: bool = False  # `fn` takes `layout.ChannelsLast` arguments


@dataclasses.dataclass
class Program:
    """A lowered graph: its steps, where each input comes from and where each output goes.

    `inputs[i]` is ("param", torch_name), ("buffer", torch_name), ("const", array)
    or ("input", k); `outputs[j]` is ("buffer", torch_name) for a running-stat
    update, ("user", k) for the k-th user output, or ("drop", name) for counters
    we do not keep (`num_batches_tracked`).
    """

    name: str
    steps: list[Step]
    placeholders: list[torch.fx.Node]
    inputs: list[tuple[str, Any]]
    outputs: list[tuple[str, Any]]
    output_node: torch.fx.Node
    random: bool
    outputs_by_module: dict[str, torch.fx.Node] | None = dataclasses.field(default=None, repr=False)  # module_outputs

    @property
    def param_names(self) -> list[str]:
        return [k for kind, k in self.inputs if kind == "param"]

    @property
    def buffer_names(self) -> list[str]:
        return [k for kind, k in self.inputs if kind == "buffer"]

    @property
    def mutated_buffers(self) -> list[str]:
        return [k for kind, k in self.outputs if kind == "buffer"]


def bind_arguments(target: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Positional arguments in schema order, keyword-only ones included, defaults filled in."""
    if not isinstance(target, torch._ops.OpOverload):
        if kwargs:
            raise TypeError(f"{op_name(target)}: unexpected keyword arguments {sorted(kwargs)}")
        return tuple(args)
    out = []
    for i, arg in enumerate(target._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            out.append(args[i])
        elif arg.name in kwargs:
            out.append(kwargs[arg.name])
        elif arg.has_default_value():
            out.append(arg.default_value)
        else:
            raise TypeError(f"{op_name(target)}: missing argument {arg.name!r}")
    return tuple(out)


def _strip(name: str, prefix: str, aliases: Mapping[str, str] | None = None) -> str:
    name = name[len(prefix):] if prefix and name.startswith(prefix) else name
    return (aliases or {}).get(name, name)


def lower(ep: ExportedProgram, *, name: str, prefix: str = "", aliases: Mapping[str, str] | None = None) -> Program:
    """Check an exported (core-ATen) program against the op table and describe its signature.

    `prefix` is stripped from parameter/buffer names (a wrapper module's
    attribute, when a method other than `forward` was exported); `aliases` maps
    a tied tensor's other names to the one the variables use. Raises
    `UnsupportedOpError` listing every missing op with the node and source line
    of its first use.
    """
    missing: dict[str, torch.fx.Node] = {}
    steps, placeholders = [], []
    output_node = None
    for i, node in enumerate(ep.graph.nodes):
        if node.op == "placeholder":
            placeholders.append(node)
        elif node.op == "output":
            output_node = node
        elif node.op == "call_function":
            fn = ops.OPS.get(node.target)
            if fn is None:
                missing.setdefault(op_name(node.target), node)
                continue
            aware = layout.OPS.get(node.target)
            steps.append(Step(node, aware or fn, bind_arguments(node.target, node.args, node.kwargs), i,
                              aware is not None))
        else:
            missing.setdefault(f"{node.op} {node.target}", node)
    if missing:
        found = [f"{op} (node {n.name!r} at {source_line(n)})" for op, n in missing.items()]
        # One line, like every user error the CLI prints (`torch2flax: error: ...`).
        raise UnsupportedOpError(f"{name}: {len(missing)} op(s) not in torch2flax's op table: " + "; ".join(found)
                                 + ". Convert another model (`torch2flax list`), or report the op(s) to torch2flax")

    sig = ep.graph_signature
    persistent = set(ep.state_dict)
    inputs: list[tuple[str, Any]] = []
    user = 0
    for spec in sig.input_specs:
        target = spec.target
        if spec.kind == InputKind.PARAMETER:
            inputs.append(("param", _strip(target, prefix, aliases)))
        elif spec.kind == InputKind.BUFFER and target.endswith("num_batches_tracked"):
            # BN's step counter matters only with momentum=None (cumulative averaging), which timm never uses.
            inputs.append(("const", jnp.zeros((), jnp.int32)))
        elif spec.kind == InputKind.BUFFER and target in persistent:
            inputs.append(("buffer", _strip(target, prefix, aliases)))
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            # Non-persistent buffers (position indices, rope tables) and lifted constants:
            # fixed by the architecture, so they live with the program, not in the variables.
            value = ep.constants[target] if target in ep.constants else ep.state_dict[target]
            inputs.append(("const", _to_jax(value)))
        elif spec.kind == InputKind.USER_INPUT:
            inputs.append(("input", user))
            user += 1
        else:
            raise UnsupportedOpError(f"{name}: graph input {spec.arg.name} of kind {spec.kind.name}")
    outputs: list[tuple[str, Any]] = []
    user = 0
    for spec in sig.output_specs:
        if spec.kind == OutputKind.BUFFER_MUTATION:
            target = _strip(spec.target, prefix, aliases)
            outputs.append(("drop" if target.endswith("num_batches_tracked") else "buffer", target))
        elif spec.kind == OutputKind.USER_OUTPUT:
            outputs.append(("user", user))
            user += 1
        else:
            raise UnsupportedOpError(f"{name}: graph output {spec.arg} of kind {spec.kind.name} (input mutation)")
    random = any(s.node.target in ops.RANDOM_OPS for s in steps)
    return Program(name, steps, placeholders, inputs, outputs, output_node, random)


def _to_jax(t: torch.Tensor) -> Array:
    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.float().numpy(), jnp.bfloat16)
    return jnp.asarray(t.detach().cpu().numpy())


def _lookup(env: dict[torch.fx.Node, Any], value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return env[value]
    if isinstance(value, (list, tuple)):
        return type(value)(_lookup(env, v) for v in value)
    if isinstance(value, dict):
        return {k: _lookup(env, v) for k, v in value.items()}
    return value


def run(
    program: Program,
    params: Mapping[str, Array],
    buffers: Mapping[str, Array],
    inputs: Sequence[Array],
    *,
    rng: Array | None = None,
    axis_name: str | None = None,
    dtype: Any = jnp.float32,
    hooks: Mapping[torch.fx.Node, Any] | None = None,
) -> tuple[list[Any], dict[str, Array]]:
    """Evaluate a program: (user outputs, {buffer name: updated value}).

    `params`/`buffers` map torch names to arrays (floating params are cast to
    `dtype`, buffers are used as given); a 4-D input may be a `layout.ChannelsLast`
    (NHWC data), outputs are always in the graph's layout; `rng` feeds the random ops, folded with
    each node's index; `axis_name` makes training BatchNorm average its batch
    statistics over that mapped axis. `hooks` maps nodes to functions that see (and
    may replace) the node's value, for intermediate outputs (`module_outputs`).
    """
    env: dict[torch.fx.Node, Any] = {}
    for node, (kind, key) in zip(program.placeholders, program.inputs):
        if kind == "param":
            v = params[key]
            env[node] = v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
        elif kind == "buffer":
            env[node] = buffers[key]
        elif kind == "const":
            env[node] = key.astype(dtype) if key.dtype == jnp.float32 else key
        else:
            env[node] = inputs[key]
    ctx = ops.RunContext(rng=rng, axis_name=axis_name, float_dtype=jnp.dtype(dtype))
    with ops.running(ctx):
        for step in program.steps:
            ctx.node_index = step.index
            args = _lookup(env, step.args)
            try:
                env[step.node] = step.fn(*(args if step.channels_last else layout.materialize(args)))
            except Exception as e:  # name the node whatever the op raised
                raise GraphError(
                    f"{program.name}: {op_name(step.node.target)} failed at node {step.node.name!r} "
                    f"({source_line(step.node)}): {type(e).__name__}: {e}"
                ) from e
            if hooks and step.node in hooks:
                env[step.node] = hooks[step.node](env[step.node])
    results = layout.materialize(_lookup(env, program.output_node.args[0]))
    user: list[Any] = []
    updates: dict[str, Array] = {}
    for (kind, key), value in zip(program.outputs, results):
        if kind == "user":
            user.append(value)
        elif kind == "buffer":
            updates[key] = value
    return user, updates


def module_outputs(program: Program, prefix: str = "") -> dict[str, torch.fx.Node]:
    """The node holding each timm module's output, by module path (`"layer3"`, `"stages.2.blocks.0"`).

    torch.export records the module stack of every node (`nn_module_stack`); a module's
    output is its last node in graph order whose value is used outside the module (by a node
    of another module or as a user output of the graph). Running-stat updates, which leave
    through the graph's buffer outputs, do not count. Modules without nodes (`Identity`) are absent.
    `prefix` is stripped from the paths (a wrapper's attribute, as `lower` strips it from names).
    """
    if program.outputs_by_module is not None:
        return program.outputs_by_module
    scopes = {s.node: {path for path, _ in (s.node.meta.get("nn_module_stack") or {}).values()}
              for s in program.steps}
    results = program.output_node.args[0]
    user_results = {results[i] for i, (kind, _) in enumerate(program.outputs) if kind == "user"}
    out: dict[str, torch.fx.Node] = {}
    for step in program.steps:  # graph order: the last node leaving a module wins
        node = step.node
        for path in scopes[node]:
            if path and (node in user_results or any(
                    u is not program.output_node and path not in scopes.get(u, ()) for u in node.users)):
                out[path[len(prefix):] if prefix and path.startswith(prefix) else path] = node
    program.outputs_by_module = out
    return out


def abstract_check(program: Program, params: Mapping[str, Any], buffers: Mapping[str, Any],
                   inputs: Sequence[Any]) -> Any:
    """Trace the program once without computing (`jax.eval_shape`): op-argument errors surface at conversion."""
    def spec(a: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(np.shape(a), jax.dtypes.canonicalize_dtype(np.asarray(a).dtype))

    has_random = program.random
    return jax.eval_shape(
        lambda p, b, x: run(program, p, b, x, rng=jax.random.key(0) if has_random else None),
        {k: spec(v) for k, v in params.items()}, {k: spec(v) for k, v in buffers.items()},
        [spec(x) for x in inputs],
    )

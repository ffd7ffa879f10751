"""What the compiled training step contains, read from its graph and its HLO: the checks
that tests/test_gpu.py asserts and the benchmark reports (no GPU needed for any of them).

  hlo_flops(text)        convolution + dot FLOPs of an HLO module, from shapes alone
  step_hlo(trainer)      the HLO of one replica's compiled step
  loop_counts(trainer)   graph ops that run per step outside XLA, per replica, and host reads
  function_op_types / xla_functions / HOST_CALLBACK_OPS: the traced graph's op types
"""

from __future__ import annotations

import math
import re

# Graph nodes that launch no kernel: constants, identities, function plumbing and the calls
# into non-XLA functions (their bodies are counted instead).
NO_KERNEL_OPS = {"Const", "NoOp", "Identity", "IdentityN", "_Arg", "_Retval", "Placeholder",
                 "StatefulPartitionedCall", "PartitionedCall"}
HOST_CALLBACK_OPS = ("PyFunc", "PyFuncStateless", "EagerPyFunc", "NumpyFunction")

_HLO_ARRAY = r"(?:pred|[suf]\d+|bf16|f8\w*|c64|c128)\[([0-9,]*)\]"
_HLO_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*" + _HLO_ARRAY)
_HLO_OP = re.compile(r"\s(convolution|dot)\(([^)]*)\)(.*)$")


def _dims(text):
    return [int(d) for d in text.split(",") if d]


def hlo_flops(hlo_text: str) -> dict:
    """FLOPs (2 x multiply-adds) of every convolution and dot in an HLO module's text.

    Method: shapes only, no cost model. For each `convolution(` line: 2 x (elements of the
    result) x (elements of the window, `window={size=AxB}`) x (size of the lhs dimension
    labelled `f` in `dim_labels`, the contracted input features) / feature_group_count.
    The same formula covers the forward, input-gradient and filter-gradient convolutions
    (for a filter gradient XLA labels the batch as the lhs `f` dimension and the window is
    the image, so it counts batch x H x W taps per kernel element). Padded taps count, as in
    the hand count of model.forward_flops_per_image. For each `dot(` line: 2 x (elements of
    the result) x (product of the lhs contracting dimensions). Operand shapes are read
    inline (stage='hlo' prints them) or, in optimized HLO (operands by name only), from the
    instruction that defines the name.
    """
    shapes = {}
    for line in hlo_text.splitlines():
        m = _HLO_DEF.match(line)
        if m:
            shapes[m.group(1)] = _dims(m.group(2))
    out = {"convolution": 0, "dot": 0, "convolution_ops": 0, "dot_ops": 0}
    for line in hlo_text.splitlines():
        d = _HLO_DEF.match(line)
        m = _HLO_OP.search(line)
        if not (d and m):
            continue
        kind, operands, attrs = m.groups()
        result = _dims(d.group(2))
        inline = re.findall(_HLO_ARRAY, operands)
        if len(inline) >= 2:
            lhs = _dims(inline[0])
        else:
            names = re.findall(r"%?([\w.\-]+)", operands)
            lhs = shapes[names[0]]
        if kind == "convolution":
            window = re.search(r"size=([0-9x]+)", attrs)
            taps = math.prod(int(v) for v in window.group(1).split("x")) if window else 1
            labels = re.search(r"dim_labels=(\w+)_", attrs).group(1)
            groups = re.search(r"feature_group_count=(\d+)", attrs)
            features = lhs[labels.index("f")] // (int(groups.group(1)) if groups else 1)
            flops = 2 * math.prod(result) * taps * features
        else:
            contract = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
            flops = 2 * math.prod(result) * math.prod(lhs[i] for i in _dims(contract.group(1)))
        out[kind] += flops
        out[kind + "_ops"] += 1
    out["total"] = out["convolution"] + out["dot"]
    return out


def step_hlo(trainer, stage="hlo") -> str:
    """HLO text of one replica's compiled step: the fused step (batch -> gradients -> update)
    on one replica, the gradient step on more. Inputs are a zero batch of one replica."""
    import tensorflow as tf  # noqa: PLC0415

    steps = trainer.steps
    per_replica = trainer.cfg.batch_size // trainer.replicas
    if steps.device_data is not None:
        n = steps.device_data.num_examples
        inputs = (tf.zeros([n, 32, 32, 3], tf.uint8), tf.zeros([n], tf.int32),
                  tf.range(n, dtype=tf.int32))
    else:
        inputs = (tf.zeros([per_replica, 32, 32, 3], tf.uint8), tf.zeros([per_replica], tf.int32),
                  tf.range(per_replica, dtype=tf.int64))  # (images, labels, example ids)
    fn = steps.fused_step if trainer.replicas == 1 else steps.grads_step
    return fn.experimental_get_compiler_ir(inputs, tf.constant(0), tf.constant(0))(stage=stage)


def _library(graph_def) -> dict:
    return {fn.signature.name: fn for fn in graph_def.library.function}


def function_op_types(concrete_function) -> dict:
    """{op type: count} over a concrete function's graph and every function it calls."""
    graph_def = concrete_function.graph.as_graph_def()
    counts = {}
    for node in graph_def.node:
        counts[node.op] = counts.get(node.op, 0) + 1
    for fn in graph_def.library.function:
        for node in fn.node_def:
            counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def _is_xla(fn) -> bool:
    return fn.attr.get("_XlaMustCompile") is not None and fn.attr["_XlaMustCompile"].b


def xla_functions(concrete_function) -> list:
    """Names of the library functions marked for XLA compilation (_XlaMustCompile)."""
    return [name for name, fn in _library(concrete_function.graph.as_graph_def()).items()
            if _is_xla(fn)]


def _called(node) -> list:
    """Names of the functions a node calls (function calls, While/If bodies)."""
    return [value.func.name for value in node.attr.values() if value.func.name]


def kernel_ops(nodes, library) -> dict:
    """{op type: count} of the kernels `nodes` launch outside XLA, following calls into
    non-XLA functions; a call of an XLA function is one launch (`XlaLaunch`)."""
    counts = {}

    def walk(node_list):
        for node in node_list:
            targets = [library[name] for name in _called(node) if name in library]
            if any(_is_xla(fn) for fn in targets):
                counts["XlaLaunch"] = counts.get("XlaLaunch", 0) + 1
                continue
            if node.op not in NO_KERNEL_OPS and node.op != "While":
                counts[node.op] = counts.get(node.op, 0) + 1
            if node.op != "While":
                for fn in targets:
                    walk(fn.node_def)

    walk(nodes)
    return counts


def loop_counts(trainer) -> dict:
    """Graph ops of the training call: per step (the while loop's condition and body) and per
    call (around the loop), outside XLA, each the launch of one kernel on a GPU."""
    import tensorflow as tf  # noqa: PLC0415

    steps, n, stop = trainer.steps, tf.constant(1), tf.constant(0)
    if steps.device_data is not None:
        concrete = steps.loop_on_device.get_concrete_function(*trainer.inputs(0, None), n, stop)
    else:
        concrete = steps.loop_on_iterator.get_concrete_function(trainer.train_iterator(0), n, stop)
    graph_def = concrete.graph.as_graph_def()
    library = _library(graph_def)
    loops = [node for node in graph_def.node if node.op in ("While", "StatelessWhile")]
    assert len(loops) == 1, [node.op for node in graph_def.node]
    loop = loops[0]
    per_step = {}
    for part in ("cond", "body"):
        for op, count in kernel_ops(library[loop.attr[part].func.name].node_def, library).items():
            per_step[op] = per_step.get(op, 0) + count
    per_call = kernel_ops([node for node in graph_def.node if node is not loop], library)
    replicas = trainer.replicas
    return {"ops_outside_xla_per_replica_per_step": sum(per_step.values()) / replicas,
            "ops_outside_xla_per_step_by_type": dict(sorted(per_step.items(), key=lambda kv: -kv[1])),
            "ops_outside_xla_per_call": sum(per_call.values()),
            "xla_functions": len(xla_functions(concrete)),
            "host_callbacks": sorted(set(function_op_types(concrete)) & set(HOST_CALLBACK_OPS))}


def images_dtype(element_spec) -> str:
    """dtype of the images of a (distributed) iterator's element_spec (PerReplicaSpec aware)."""
    spec = element_spec[0]
    for inner in getattr(spec, "_value_specs", ())[:1]:  # PerReplicaSpec: one spec per replica
        spec = inner
    return spec.dtype.name

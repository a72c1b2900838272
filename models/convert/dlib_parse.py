"""Parse a serialized dlib network (layer by layer) into a ``DlibNetwork``, numpy only.

See ``models.convert.dlib_format`` for the encoding and the order of the fields in the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.convert.dlib_format import (
    AddPrev,
    Affine,
    Conv,
    Dense,
    DlibFormatError,
    DlibNetwork,
    DlibReader,
    InputRGB,
    Layer,
    LossMetric,
    Pool,
    Relu,
    Skip,
    SpecNode,
    Tag,
)

logger = logging.getLogger(__name__)


def _detail_header(reader: DlibReader) -> str:
    return reader.read_string("layer header")


def _read_conv(reader: DlibReader, header: str, node: SpecNode) -> Conv:
    if header not in ("con_4", "con_5", "con_6"):
        raise DlibFormatError(f"expected con_ details, found '{header}'")
    params = reader.read_tensor("con_ params").reshape(-1)
    num_filters = reader.read_int("con_ num_filters")
    nr, nc = reader.read_int("con_ nr"), reader.read_int("con_ nc")
    stride = (reader.read_int("con_ stride_y"), reader.read_int("con_ stride_x"))
    padding = (reader.read_int("con_ padding_y"), reader.read_int("con_ padding_x"))
    fshape = reader.read_alias("con_ filters")
    bshape = reader.read_alias("con_ biases")
    for name in ("lr", "wd", "bias lr", "bias wd"):
        reader.read_float(f"con_ {name} multiplier")
    use_bias = reader.read_bool("con_ use_bias") if header in ("con_5", "con_6") else True
    if header == "con_6" and reader.read_bool("con_ use_relu"):
        raise DlibFormatError("con_ with a fused relu is not supported")
    expected = node.args  # (num_filters, nr, nc, stride_y, stride_x)
    if expected and (num_filters, nr, nc, *stride) != expected:
        raise DlibFormatError(f"con_ is ({num_filters},{nr},{nc},{stride}), spec says {expected}")
    fsize = int(np.prod(fshape))
    if fshape[0] != num_filters or fshape[2:] != (nr, nc) or params.size < fsize:
        raise DlibFormatError(f"con_ filter shape {fshape} does not fit params of {params.size}")
    filters = params[:fsize].reshape(fshape)
    bias = None
    if use_bias and params.size >= fsize + int(np.prod(bshape)) > fsize:
        bias = params[fsize:fsize + int(np.prod(bshape))].copy()
    return Conv(filters=filters.copy(), bias=bias, stride=stride, padding=padding)


def _read_affine(reader: DlibReader, header: str) -> Affine:
    if header in ("bn_con2", "bn_fc2"):
        params = reader.read_tensor("bn_ params").reshape(-1)
        gshape, _ = reader.read_alias("bn_ gamma"), reader.read_alias("bn_ beta")
        reader.read_tensor("bn_ means")
        reader.read_tensor("bn_ invstds")
        running_means = reader.read_tensor("bn_ running_means").reshape(-1)
        running_vars = reader.read_tensor("bn_ running_variances").reshape(-1)
        reader.read_int("bn_ num_updates")
        reader.read_int("bn_ running_stats_window_size")
        for name in ("lr", "wd", "bias lr", "bias wd"):
            reader.read_float(f"bn_ {name} multiplier")
        eps = reader.read_float("bn_ eps")
        n = int(np.prod(gshape))
        # Same arithmetic as dlib's affine_(const bn_&) constructor, in float32.
        gamma = params[:n] / np.sqrt(running_vars + np.float32(eps))
        beta = params[n:2 * n] - gamma * running_means
        return Affine(gamma=gamma.astype(np.float32), beta=beta.astype(np.float32))
    if header not in ("affine_", "affine_2"):
        raise DlibFormatError(f"expected affine_ details, found '{header}'")
    params = reader.read_tensor("affine_ params").reshape(-1)
    gshape = reader.read_alias("affine_ gamma")
    reader.read_alias("affine_ beta")
    reader.read_int("affine_ mode")
    if header == "affine_2" and reader.read_bool("affine_ disabled"):
        return Affine(gamma=np.ones(0, np.float32), beta=np.zeros(0, np.float32))
    n = int(np.prod(gshape))
    if params.size != 2 * n:
        raise DlibFormatError(f"affine_ params hold {params.size} values, expected {2 * n}")
    return Affine(gamma=params[:n].copy(), beta=params[n:].copy())


def _read_relu(reader: DlibReader, header: str) -> Relu:
    if header == "relu_2":
        if reader.read_bool("relu_ disabled"):
            raise DlibFormatError("a disabled relu_ is not supported")
    elif header != "relu_":
        raise DlibFormatError(f"expected relu_ details, found '{header}'")
    return Relu()


def _read_pool(reader: DlibReader, header: str, node: SpecNode) -> Pool:
    kind = "max" if node.layer == "max_pool" else "avg"
    if header != f"{kind}_pool_2":
        raise DlibFormatError(f"expected {kind}_pool_2 details, found '{header}'")
    size = (reader.read_int("pool nr"), reader.read_int("pool nc"))
    stride = (reader.read_int("pool stride_y"), reader.read_int("pool stride_x"))
    padding = (reader.read_int("pool padding_y"), reader.read_int("pool padding_x"))
    if node.args and (*size, *stride) != node.args:
        raise DlibFormatError(f"{kind}_pool is {size}/{stride}, spec says {node.args}")
    return Pool(kind=kind, size=size, stride=stride, padding=padding)


def _read_fc(reader: DlibReader, header: str, node: SpecNode) -> Dense:
    if header not in ("fc_2", "fc_3"):
        raise DlibFormatError(f"expected fc_ details, found '{header}'")
    num_outputs, num_inputs = reader.read_int("fc_ num_outputs"), reader.read_int("fc_ num_inputs")
    params = reader.read_tensor("fc_ params").reshape(-1)
    reader.read_alias("fc_ weights")
    reader.read_alias("fc_ biases")
    bias_mode = reader.read_int("fc_ bias_mode")  # 0 FC_HAS_BIAS, 1 FC_NO_BIAS
    for name in ("lr", "wd", "bias lr", "bias wd"):
        reader.read_float(f"fc_ {name} multiplier")
    use_bias = reader.read_bool("fc_ use_bias") if header == "fc_3" else True
    if node.args and num_outputs != node.args[0]:
        raise DlibFormatError(f"fc_ has {num_outputs} outputs, spec says {node.args[0]}")
    wsize = num_inputs * num_outputs
    if params.size < wsize:
        raise DlibFormatError(f"fc_ params hold {params.size} values, need {wsize}")
    weights = params[:wsize].reshape(num_inputs, num_outputs).copy()
    has_bias = bias_mode == 0 and use_bias and params.size >= wsize + num_outputs
    bias = params[wsize:wsize + num_outputs].copy() if has_bias else None
    return Dense(weights=weights, bias=bias)


def _read_input(reader: DlibReader, node: SpecNode) -> InputRGB:
    header = reader.read_string("input layer header")
    if header not in ("input_rgb_image", "input_rgb_image_sized"):
        raise DlibFormatError(f"expected an input_rgb_image layer, found '{header}'")
    mean = (reader.read_float("avg_red"), reader.read_float("avg_green"), reader.read_float("avg_blue"))
    rows = cols = 0
    if header == "input_rgb_image_sized":
        rows, cols = reader.read_int("input rows"), reader.read_int("input cols")
    if node.args and (rows, cols) != node.args:
        raise DlibFormatError(f"input is {rows}x{cols}, spec says {node.args}")
    return InputRGB(mean_rgb=mean, rows=rows, cols=cols)


def _read_details(reader: DlibReader, node: SpecNode, headers: list[str]) -> Layer:
    header = _detail_header(reader)
    headers.append(header)
    if node.layer == "con":
        return _read_conv(reader, header, node)
    if node.layer == "affine":
        return _read_affine(reader, header)
    if node.layer == "relu":
        return _read_relu(reader, header)
    if node.layer in ("max_pool", "avg_pool"):
        return _read_pool(reader, header, node)
    if node.layer == "fc":
        return _read_fc(reader, header, node)
    if node.layer == "add_prev":
        if header != "add_prev_":
            raise DlibFormatError(f"expected add_prev_ details, found '{header}'")
        return AddPrev(tag=node.tag)
    raise DlibFormatError(f"spec names an unknown layer '{node.layer}'")


def _read_add_layer_tail(reader: DlibReader, version: int, on_input: bool) -> None:
    """The bookkeeping an ``add_layer`` writes after its details (flags and empty work tensors)."""
    for name in ("this_layer_setup_called", "gradient_input_is_stale", "output_disabled"):
        reader.read_bool(name)
    reader.read_tensor("x_grad")
    reader.read_tensor("cached_output")
    if on_input:
        reader.read_tensor("grad_final")
        if version >= 3:
            reader.read_int("sample_expansion_factor")
    elif version == 2:
        reader.read_tensor("params_grad")


def parse_network(data: bytes, spec: list[SpecNode]) -> DlibNetwork:
    """Parse a serialized dlib network whose C++ type is ``spec`` (outermost wrapper first)."""
    if len(spec) < 2 or spec[-1].kind != "input":
        raise DlibFormatError("a spec must end with its input layer")
    reader = DlibReader(data)
    loss: LossMetric | None = None
    versions: list[int] = []
    for index, node in enumerate(spec[:-1]):
        on_input = index == len(spec) - 2
        if node.kind == "loss":
            reader.expect_version((1,), "add_loss_layer")
            header = reader.read_string("loss header")
            if header == "loss_metric_2":
                loss = LossMetric(reader.read_float("margin"), reader.read_float("distance_threshold"))
            elif header == "loss_metric_":
                loss = LossMetric(0.1, 0.75)  # dlib's hard-coded values for the first version
            else:
                raise DlibFormatError(f"expected loss_metric_, found '{header}'")
            versions.append(1)
        elif node.kind == "layer":
            versions.append(reader.expect_version((2, 3) if on_input else (1, 2), f"add_layer<{node.layer}>"))
        elif node.kind in ("tag", "skip"):
            versions.append(reader.expect_version((1, 2) if on_input else (1,), f"{node.kind}{node.tag}"))
        else:
            raise DlibFormatError(f"unexpected spec node kind '{node.kind}' at {index}")
    net_input = _read_input(reader, spec[-1])
    layers: list[Layer] = []
    headers: list[str] = []
    for index in range(len(spec) - 2, -1, -1):
        node, version = spec[index], versions[index]
        on_input = index == len(spec) - 2
        if node.kind == "layer":
            layers.append(_read_details(reader, node, headers))
            _read_add_layer_tail(reader, version, on_input)
        elif node.kind == "tag":
            if on_input:
                raise DlibFormatError("a tag directly on the input layer is not supported")
            layers.append(Tag(node.tag))
        elif node.kind == "skip":
            layers.append(Skip(node.tag))
    if reader.pos != len(data):
        raise DlibFormatError(f"{len(data) - reader.pos} unread bytes after the network: the file does "
                              "not match the expected network type")
    return DlibNetwork(input=net_input, layers=layers, loss=loss, headers=headers)


def parse_file(path: Path, spec: list[SpecNode]) -> DlibNetwork:
    """Read and parse a ``.dat`` network file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DlibFormatError(f"cannot read {path}: {exc}") from exc
    network = parse_network(data, spec)
    logger.info("parsed %s: %d layers, %d parameters", Path(path).name, len(network.layers),
                network.parameter_count())
    return network

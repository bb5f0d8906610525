"""Builds the ONNX test models with onnx.helper (deterministic, small), into a folder given on the
command line or imported by the tests. Each model is float32 unless its name says otherwise."""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def rng(seed):
    return np.random.default_rng(seed)


def init(name, array):
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def save(model, path, check=True):
    if check:
        onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, path)


def mlp(path, hidden=(64, 128, 32), opset=17, ir=8):
    r = rng(1)
    nodes, inits = [], []
    prev = "x"
    for i in range(len(hidden) - 1):
        w = (r.standard_normal((hidden[i], hidden[i + 1])) / np.sqrt(hidden[i])).astype(np.float32)
        b = (r.standard_normal(hidden[i + 1]) * 0.1).astype(np.float32)
        inits += [init(f"fc{i}.weight", w), init(f"fc{i}.bias", b)]
        nodes.append(helper.make_node("MatMul", [prev, f"fc{i}.weight"], [f"mm{i}"], name=f"mm{i}"))
        out = "y" if i == len(hidden) - 2 else f"h{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [f"a{i}" if out != "y" else "y"], name=f"add{i}"))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out], name=f"relu{i}"))
        prev = out
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", hidden[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", hidden[-1]])], inits, doc_string="an MLP")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="qconvert-tests", ir_version=ir)
    m.metadata_props.add(key="author", value="tests")
    save(m, path)


def gemm(path):
    r = rng(2)
    w = (r.standard_normal((48, 96)) / 10).astype(np.float32)      # [N, K] with transB=1
    b = r.standard_normal(48).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="gemm")], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 96])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 48])], [init("w", w), init("b", b)])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), path)


def cnn(path):
    r = rng(3)
    w1 = (r.standard_normal((16, 3, 3, 3)) / 5).astype(np.float32)
    w2 = (r.standard_normal((16, 8, 3, 3)) / 10).astype(np.float32)  # ConvTranspose [C, M/g, k, k]
    w3 = (r.standard_normal((32, 8, 3, 3)) / 10).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("ConvTranspose", ["r1", "w2"], ["c2"], strides=[2, 2], name="deconv"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 15, 15])], [init("w1", w1), init("w2", w2), init("w3", w3)])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), path)


def constants_opset11(path):
    """Weights held in Constant nodes, opset 11 (no per-axis DequantizeLinear), typed float_data payloads."""
    r = rng(4)
    w = (r.standard_normal((32, 64)) / 6).astype(np.float32)
    t = helper.make_tensor("wc", TensorProto.FLOAT, w.shape, w.reshape(-1).tolist())   # float_data, not raw_data
    nodes = [helper.make_node("Constant", [], ["wc"], value=t, name="const_w"),
             helper.make_node("MatMul", ["x", "wc"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "consts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)], ir_version=6), path)


def if_subgraph(path):
    r = rng(5)
    wt = (r.standard_normal((32, 32)) / 6).astype(np.float32)
    wf = (r.standard_normal((32, 32)) / 6).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w_then"], ["yt"])], "then", [],
                               [helper.make_tensor_value_info("yt", TensorProto.FLOAT, [2, 32])], [init("w_then", wt)])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "w_else"], ["ye"])], "else", [],
                               [helper.make_tensor_value_info("ye", TensorProto.FLOAT, [2, 32])], [init("w_else", wf)])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="if")]
    g = helper.make_graph(nodes, "ifmodel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32]),
                                             helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def shared(path):
    r = rng(6)
    w = (r.standard_normal((40, 40)) / 6).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "w"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 40])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 40])], [init("w", w)])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), path)


def fp16(path):
    r = rng(7)
    w = (r.standard_normal((64, 48)) / 8).astype(np.float16)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "fp16",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 48])], [init("w", w)])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), path)


def external(path):
    r = rng(8)
    w = (r.standard_normal((64, 96)) / 8).astype(np.float32)
    b = r.standard_normal(96).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    g = helper.make_graph(nodes, "ext", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 96])], [init("w", w), init("b", b)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(m, full_check=True)
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=0)


def lstm(path):
    r = rng(9)
    hidden, inp = 32, 16
    W = (r.standard_normal((1, 4 * hidden, inp)) / 4).astype(np.float32)
    R = (r.standard_normal((1, 4 * hidden, hidden)) / 6).astype(np.float32)
    B = (r.standard_normal((1, 8 * hidden)) / 10).astype(np.float32)
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Y_h"], hidden_size=hidden, name="lstm")]
    g = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, inp])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [5, 1, 2, hidden]), helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, 2, hidden])],
                          [init("W", W), init("R", R), init("B", B)])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], ir_version=7), path)


def old_ir_inputs(path):
    """IR 3 style: the initializer is also listed as a graph input."""
    r = rng(10)
    w = (r.standard_normal((32, 48)) / 6).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "oldir",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [32, 48])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48])], [init("w", w)])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=3), path, check=False)


def function_body(path):
    """A model-local function whose body holds its weight in a Constant node."""
    r = rng(11)
    w = (r.standard_normal((32, 48)) / 6).astype(np.float32)
    body = [helper.make_node("Constant", [], ["fw"], value=numpy_helper.from_array(w, "fw"), name="fconst"),
            helper.make_node("MatMul", ["a", "fw"], ["b"], name="fmm")]
    f = helper.make_function("local", "Project", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("Project", ["x"], ["y"], domain="local", name="call")], "fn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[f], ir_version=8)
    save(m, path)


def mlp21(path):
    mlp(path, hidden=(64, 128, 32), opset=21, ir=10)


BUILDERS = {"mlp": mlp, "mlp21": mlp21, "gemm": gemm, "cnn": cnn, "constants11": constants_opset11, "if": if_subgraph,
            "shared": shared, "fp16": fp16, "external": external, "lstm": lstm, "oldir": old_ir_inputs, "function": function_body}


def build_all(folder):
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, fn in BUILDERS.items():
        sub = os.path.join(folder, name)
        os.makedirs(sub, exist_ok=True)
        p = os.path.join(sub, name + ".onnx")
        if not os.path.exists(p):
            fn(p)
        paths[name] = p
    return paths


if __name__ == "__main__":
    print(build_all(sys.argv[1] if len(sys.argv) > 1 else "onnx-models"))

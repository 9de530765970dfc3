"""Rules shared by the matcher and explain tests (imported by name: pytest puts this folder
on sys.path)."""

# Relu(Transpose(Transpose(x))) with perm [1, 0] twice: three pattern nodes
TRANSPOSE_PAIR = {
    "name": "cancel-transpose-pair",
    "source": {"inputs": ["x"],
               "nodes": [{"id": "t1", "op": "Transpose", "inputs": ["x"],
                          "attrs": {"perm": [1, 0]}},
                         {"id": "t2", "op": "Transpose", "inputs": ["t1"],
                          "attrs": {"perm": [1, 0]}},
                         {"id": "r", "op": "Relu", "inputs": ["t2"]}],
               "outputs": ["r"]},
    "target": {"inputs": ["x"], "nodes": [{"id": "r", "op": "Relu", "inputs": ["x"]}],
               "outputs": ["r"]},
}

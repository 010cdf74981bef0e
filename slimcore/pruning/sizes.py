"""Model code that sizes a split, slice, view or new head with a number (``self.c``, timm's
``num_features``): finds the attributes to change, or ties channels together so that the sizes the
code computes stay right.
"""

import itertools

import torch

from .._modules import parent_module
from .apply import apply_plan, in_collapsed_blocks, module_plans, plan_changes
from .graph import attribute_fixes, meta_copy, size_changes, verify
from .modules import ResidualConstant


def _module_of(plan):
    """Name of the module a plan changes (a channel_param plan is named module.attribute)."""
    return plan.name[: -len(plan.attrs[0])].rstrip(".") if plan.kind == "channel_param" else plan.name


def _apply_to_copy(copy_model, graph, kept_atom, collapsed, fixes):
    """Applies the plan to a data-less copy of the model: shapes and attributes only."""
    plans = module_plans(graph, kept_atom)
    in_collapsed = in_collapsed_blocks(plans, collapsed)
    for plan in plans:
        if plan_changes(plan) and plan.name not in in_collapsed:
            plan.module = copy_model.get_submodule(_module_of(plan))
            apply_plan(plan, None)
    stream_of = {b.name: b.stream_atoms for b in graph.residual_blocks}
    for name in collapsed:
        parent, attr = parent_module(copy_model, name)
        device = next(copy_model.get_submodule(name).parameters()).device
        setattr(parent, attr, ResidualConstant(torch.zeros(int(kept_atom[stream_of[name]].sum()), device=device)))
    for name, attr, _, new in fixes:
        setattr(copy_model.get_submodule(name), attr, new)


def _check_sizes(model, inputs, graph, kept_atom, collapsed, fixes):
    """verify() on a pruned copy: on the meta device, or on uninitialised CPU memory where the
    model's code needs real tensors (it reads values, or mixes its own tensors with the input's)."""
    for device in ("meta", "cpu"):
        copy_model = meta_copy(model, device)
        _apply_to_copy(copy_model, graph, kept_atom, collapsed, fixes)
        problems = verify(graph, copy_model, inputs, kept_atom, device)
        if not problems or not problems[0].message.startswith("the pruned model does not run"):
            break  # a run on meta tensors that fails may be the model's own (CPU) tensors meeting them
    return problems, copy_model


def chunk_attribute_fixes(model, inputs, graph, kept_atom, collapsed, fixes):
    """A module that splits with chunk() in the forward that ran may split by an attribute in
    another (ultralytics' C2f: chunk(2, 1) in forward, split((self.c, self.c), 1) in forward_split,
    which its ONNX export uses): integer attributes of that module holding the old piece size
    follow the new one. Kept only if the pruned copy still runs as planned."""
    found = []
    for node, f in _fixes_at(model, graph, graph.chunks, kept_atom):
        if f[0] == node.stack[-1] and f not in fixes + found:
            found.append(f)
    if found:
        problems, _ = _check_sizes(model, inputs, graph, kept_atom, collapsed, fixes + found)
        if problems:
            return []
    return found


def _problem_fixes(copy_model, graph, problem, kept_atom):
    """Attribute fixes for a mismatch. A size the code computes from several attributes
    (ultralytics' Attention views its qkv as ``key_dim * 2 + head_dim``) matches none of them,
    and an outer module's attribute may hold the same number by chance: the module's own sizes at
    its other checked nodes (the split by ``[key_dim, key_dim, head_dim]`` after that view) name
    the attributes one by one, so those come first."""
    node = problem.node
    if not node.stack:  # the model's own forward: no module attributes to look at
        return []
    here = [i for i in graph.checks if i != node.index and graph.capture.nodes[i].stack == node.stack]
    own = [f for _, f in _fixes_at(copy_model, graph, here, kept_atom) if f[0] == node.stack[-1]]
    return list(dict.fromkeys(own)) or attribute_fixes(copy_model, node, problem.changes)


def _similar_fixes(copy_model, graph, kept_atom, found, fixes):
    """The same attribute fixes at the other check nodes of modules of the same classes (a CSP
    stage repeated five times has five splits sized by the same attribute): found in one run
    instead of one run each."""
    kinds = {(type(copy_model.get_submodule(name)), attr) for name, attr, _, _ in found}
    named = {(f[0], f[1]) for f in found}  # one value per attribute: the fix found first
    extra = []
    for _, f in _fixes_at(copy_model, graph, graph.checks, kept_atom):
        if (type(copy_model.get_submodule(f[0])), f[1]) in kinds and (f[0], f[1]) not in named \
                and f not in fixes:
            extra.append(f)
            named.add((f[0], f[1]))
    return extra


def _fixes_at(model, graph, node_indices, kept_atom):
    """(node, attribute fix) for every module attribute that holds a size the plan changes at the
    listed nodes (graph.attribute_fixes on graph.size_changes)."""
    for i in node_indices:
        node = graph.capture.nodes[i]
        changes = size_changes(graph, node, kept_atom) if node.stack else None
        if changes:
            for f in attribute_fixes(model, node, changes):
                yield node, f


def fit_sizes(model, inputs, graph, classes, blocks, decided, redecide):
    """Checks that the pruned model's code produces the planned sizes where it writes sizes
    (split sizes, slices, views: graph.checks). Where a module attribute holds an old size,
    updating it is tried; otherwise the channels that node reads are frozen and the decision is
    made again. Returns (classes, blocks, (removed, threshold, collapsed), attribute fixes)."""
    fixes, problems, tied = [], None, set()
    for _ in range(32):
        kept_atom = ~decided[0][classes.of_atom]
        if problems is None:
            problems, copy_model = _check_sizes(model, inputs, graph, kept_atom, decided[2], fixes)
        if not problems:
            return classes, blocks, decided, fixes
        new = []  # attribute fixes for every mismatch at once, kept where they help
        for problem in problems:
            if problem.node is not None and problem.changes:
                new += [f for f in _problem_fixes(copy_model, graph, problem, kept_atom)
                        if f not in fixes and f not in new]
        helped = False
        for option in _unambiguous(new):
            option = option + _similar_fixes(copy_model, graph, kept_atom, option, fixes)
            again, again_model = _check_sizes(model, inputs, graph, kept_atom, decided[2], fixes + option)
            if len(again) < len(problems) or (again and _later(again[0].node, problems[0].node)):
                fixes += option
                problems, copy_model = again, again_model
                helped = True
                break
        if helped:
            continue
        problem = problems[0]
        if problem.node is not None and problem.node.index not in tied:
            tied.add(problem.node.index)
            if _tie_equal_pieces(graph, problem.node) or _tie_to_module_input(graph, problem.node):
                classes, blocks = redecide(None)
                decided = redecide(classes, blocks)
                fixes, problems = [], None
                continue
        nodes = [problem.node] if problem.node is not None else [graph.capture.nodes[i] for i in
                                                                 (problem.unverified or graph.checks)]
        frozen_before = int(graph.frozen.sum())
        for node in nodes:
            where = f"'{node.stack[-1]}'" if node.stack else "the model's forward"
            for v in node.refs():
                inf = graph.info.get(v)
                if inf is not None:
                    graph.freeze(inf.atoms, f"sizes written in the model's code (aten.{node.op})", where)
        if int(graph.frozen.sum()) == frozen_before and problem.node is not None:
            # The size came from elsewhere (e.g. view(B, C, H, W) with C of the module's input):
            # freeze the inputs of the module calls around the node, innermost first.
            cap = graph.capture
            for name in reversed(problem.node.stack):
                for call in cap.calls:
                    if call.name == name and call.start <= problem.node.index < call.end:
                        for v in call.inputs:
                            inf = graph.info.get(v) if v is not None else None
                            if inf is not None:
                                graph.freeze(inf.atoms, "sizes written in the model's code (from a module's input)",
                                             f"'{name}'")
                if int(graph.frozen.sum()) != frozen_before:
                    break
        if int(graph.frozen.sum()) == frozen_before and problem.node is not None:
            # Still no lead: every channel the innermost module call around the node touches.
            cap = graph.capture
            call = min((c for c in cap.calls if c.start <= problem.node.index < c.end),
                       key=lambda c: c.end - c.start, default=None)
            if call is not None:
                for node in cap.nodes[call.start:call.end]:
                    for v in (*node.refs(), *node.outputs):
                        inf = graph.info.get(v)
                        if inf is not None:
                            graph.freeze(inf.atoms, "sizes the check could not follow", f"'{call.name}'")
        if int(graph.frozen.sum()) == frozen_before:
            raise RuntimeError(f"slimcore.prune: the pruned model would not run as planned: {problem.message}")
        classes, blocks = redecide(None)
        decided = redecide(classes, blocks)
        fixes, problems = [], None  # found again for the new decision
    raise RuntimeError("slimcore.prune: the pruned model's sizes could not be made to follow the plan")


def _unambiguous(fixes, limit=8):
    """The attribute fixes to try, as alternatives: all of them, or where several attributes of a
    module hold the same old size (4 heads of 4 key channels each), one of them at a time (at most
    ``limit`` combinations)."""
    if not fixes:
        return []
    groups = {}
    for f in fixes:
        groups.setdefault((f[0], f[2] if isinstance(f[2], int) else None, str(f[3])), []).append(f)
    ambiguous = [g for key, g in groups.items() if len(g) > 1 and key[1] is not None]
    if not ambiguous:
        return [fixes]
    options = [fixes]
    for choice in itertools.islice(itertools.product(*ambiguous), limit):
        dropped = {id(f) for g, keep in zip(ambiguous, choice) for f in g if f is not keep}
        options.append([f for f in fixes if id(f) not in dropped])
    return options


def _later(node, than):
    """The first problem moved further down the model (a fix that helps)."""
    if node is None or than is None:
        return node is not than
    return node.index > than.index


def _tie_equal_pieces(graph, node):
    """A split into equal pieces whose size comes from an attribute (ultralytics' C2PSA:
    ``split((self.c, self.c), 1)``) stays valid with one attribute only if every piece keeps as
    many channels: tie channel j of each piece, as for chunk. False when the pieces differ."""
    if node.op not in ("split", "split_with_sizes"):
        return False
    infos = [graph.info.get(v) for v in node.outputs]
    if len(infos) < 2 or any(inf is None for inf in infos) or len({len(inf.atoms) for inf in infos}) != 1:
        return False
    for inf in infos[1:]:
        graph.union(infos[0].atoms, inf.atoms)
    return True


def _tie_to_module_input(graph, node):
    """A reshape whose channel count the code takes from a module's input (ultralytics' Attention:
    ``view(B, C, H, W)`` with ``B, C, H, W = x.shape``) needs as many channels as that input keeps:
    tie the two position by position (channel i of one goes with channel i of the other). Ties only
    narrow the choice, so the model stays exact; the size check runs again. False when no
    enclosing module call has an input of the reshape's channel count."""
    if node.op not in _VIEW_OPS:
        return False
    out = graph.info.get(node.outputs[0]) if node.outputs else None
    if out is None:
        return False
    cap = graph.capture
    for name in reversed(node.stack):
        for call in cap.calls:
            if call.name != name or not call.start <= node.index < call.end:
                continue
            for v in call.inputs:
                inf = graph.info.get(v) if v is not None else None
                if inf is not None and len(inf.atoms) == len(out.atoms) and inf.dim == out.dim:
                    graph.union(inf.atoms, out.atoms)
                    return True
    return False


_VIEW_OPS = {"view", "_unsafe_view", "reshape"}


# Model attributes that libraries read to build a new head (timm's reset_classifier).
_HEAD_WIDTH_ATTRS = ("num_features", "head_hidden_size")


def head_width_fixes(model, plans):
    """Sets the model's own feature-width attributes (timm: num_features) to the pruned width of
    the classifier's input, when they held its old width. Returns the changes made."""
    changed = []
    for plan in plans:
        if plan.kind != "linear" or len(plan.in_keep) == plan.n_in:
            continue
        for attr in _HEAD_WIDTH_ATTRS:
            value = getattr(model, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == plan.n_in:
                setattr(model, attr, len(plan.in_keep))
                changed.append(("", attr, value, len(plan.in_keep)))
    return changed

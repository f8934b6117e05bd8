//! Stage dependencies: refusing cycles and references to later stages, and
//! the order a build of the target runs its stages in. Promise: the order
//! puts dependencies first and, among stages ready together, lower indexes
//! first (the order BuildKit reports).

use super::planner::{Planner, StageDraft};
use crate::dockerfile::{Error, ErrorKind};
use std::collections::BTreeSet;

impl Planner<'_> {
    /// BuildKit builds stages in file order and refuses to read from a
    /// stage that comes later (only in stages the build needs).
    pub(super) fn check_forward_refs(
        &self,
        stages: &[StageDraft],
        needed: &[usize],
    ) -> Result<(), Error> {
        let label = |i: usize| {
            stages[i]
                .stage
                .name
                .clone()
                .unwrap_or_else(|| format!("stage-{i}"))
        };
        for &i in needed {
            for ins in &stages[i].stage.instructions {
                if let Some(&later) = ins.stage_refs.iter().find(|&&r| r > i) {
                    return Err(self.err(
                        ins.line,
                        ins.column,
                        ErrorKind::StageDefinedLater {
                            stage: label(later),
                            current: label(i),
                        },
                    ));
                }
            }
        }
        Ok(())
    }

    pub(super) fn check_cycles(&self, stages: &[StageDraft]) -> Result<(), Error> {
        // 0 = unvisited, 1 = on the current path, 2 = done.
        let mut state = vec![0u8; stages.len()];
        let mut path = Vec::new();
        for start in 0..stages.len() {
            if let Some(cycle) = visit(stages, start, &mut state, &mut path) {
                let label = |i: usize| {
                    stages[i]
                        .stage
                        .name
                        .clone()
                        .unwrap_or_else(|| i.to_string())
                };
                let first = stages[cycle[0]].stage.clone();
                return Err(self.err(
                    first.line,
                    1,
                    ErrorKind::Cycle(cycle.iter().map(|&i| label(i)).collect()),
                ));
            }
        }
        Ok(())
    }
}

fn visit(
    stages: &[StageDraft],
    node: usize,
    state: &mut [u8],
    path: &mut Vec<usize>,
) -> Option<Vec<usize>> {
    match state[node] {
        2 => return None,
        1 => {
            let start = path.iter().position(|&n| n == node).unwrap_or(0);
            let mut cycle = path[start..].to_vec();
            cycle.push(node);
            return Some(cycle);
        }
        _ => {}
    }
    state[node] = 1;
    path.push(node);
    for &dep in &stages[node].stage.depends_on {
        if let Some(c) = visit(stages, dep, state, path) {
            return Some(c);
        }
    }
    path.pop();
    state[node] = 2;
    None
}

/// The stages reachable from `target`, dependencies first, lower indexes
/// first among stages that are ready together. Cycles were rejected before.
pub(super) fn build_order(stages: &[StageDraft], target: usize) -> Vec<usize> {
    let mut needed = BTreeSet::new();
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if needed.insert(i) {
            todo.extend(stages[i].stage.depends_on.iter().copied());
        }
    }
    let mut order = Vec::with_capacity(needed.len());
    let mut done = BTreeSet::new();
    while order.len() < needed.len() {
        let next = needed.iter().copied().find(|i| {
            !done.contains(i) && stages[*i].stage.depends_on.iter().all(|d| done.contains(d))
        });
        match next {
            Some(i) => {
                done.insert(i);
                order.push(i);
            }
            None => break,
        }
    }
    order
}

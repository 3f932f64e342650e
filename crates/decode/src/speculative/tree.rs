//! Candidate trees: the drafter's proposal as data, compiled once into what one verification
//! pass needs (per-node depth for positions, the ancestor mask, children lists).
//!
//! Node order is topological (a parent comes before its children). The verification pass feeds
//! the *pending* token (the last accepted one, not yet in the KV cache) as row 0, then the nodes.

/// A proposed token tree rooted at the pending token.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    /// Proposed token of each node.
    pub tokens: Vec<u32>,
    /// Parent node of each node; `None` for children of the root.
    pub parent: Vec<Option<usize>>,
    /// The filtered draft distribution each node was sampled from (`(id, prob)` pairs), or
    /// `None` when the proposal is deterministic (greedy drafts, prompt lookup).
    pub q: Vec<Option<Vec<(u32, f32)>>>,
}

/// What the verification pass and the acceptance step need, derived from a [`Tree`].
#[derive(Debug, Clone)]
pub struct Compiled {
    /// Tokens of the pass: the pending token, then the nodes.
    pub tokens: Vec<u32>,
    /// Position offset of each row from the cache length (pending 0, a node 1 + its parent's).
    pub depth: Vec<usize>,
    /// `[rows, rows]`: row `i` may attend to row `j` (ancestor or self; row 0 is everyone's root).
    pub ancestors: Vec<bool>,
    /// Children of each row (row indices), in proposal order.
    pub children: Vec<Vec<usize>>,
}

impl Tree {
    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the tree has no nodes (a plain decoding step).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Append a node; returns its index. `parent` must be an existing node.
    pub fn push(&mut self, token: u32, parent: Option<usize>, q: Option<Vec<(u32, f32)>>) -> usize {
        assert!(parent.is_none_or(|p| p < self.tokens.len()), "Tree::push: parent must come first");
        self.tokens.push(token);
        self.parent.push(parent);
        self.q.push(q);
        self.tokens.len() - 1
    }

    /// A chain: each token the child of the previous.
    pub fn chain(tokens: &[u32]) -> Self {
        let mut t = Tree::default();
        for (i, &tok) in tokens.iter().enumerate() {
            t.push(tok, i.checked_sub(1), None);
        }
        t
    }

    /// Depth of the deepest node (1 for children of the root).
    pub fn max_depth(&self) -> usize {
        let mut d = vec![0usize; self.len()];
        for i in 0..self.len() {
            d[i] = 1 + self.parent[i].map_or(0, |p| d[p]);
        }
        d.into_iter().max().unwrap_or(0)
    }

    /// Compile for a pass whose row 0 is `pending`.
    pub fn compile(&self, pending: u32) -> Compiled {
        let rows = self.len() + 1;
        let row_parent = |i: usize| -> Option<usize> { (i > 0).then(|| self.parent[i - 1].map_or(0, |p| p + 1)) };
        let mut depth = vec![0usize; rows];
        let mut ancestors = vec![false; rows * rows];
        let mut children = vec![Vec::new(); rows];
        for i in 0..rows {
            ancestors[i * rows + i] = true;
            if let Some(p) = row_parent(i) {
                depth[i] = depth[p] + 1;
                children[p].push(i);
                let (before, row) = ancestors.split_at_mut(i * rows);
                row[..rows].copy_from_slice(&before[p * rows..(p + 1) * rows]);
                row[i] = true;
            }
        }
        let mut tokens = Vec::with_capacity(rows);
        tokens.push(pending);
        tokens.extend_from_slice(&self.tokens);
        Compiled { tokens, depth, ancestors, children }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_a_branching_tree() {
        // root -> a -> b ; root -> c -> d
        let mut t = Tree::default();
        let a = t.push(10, None, None);
        t.push(11, Some(a), None);
        let c = t.push(12, None, None);
        t.push(13, Some(c), None);
        let k = t.compile(9);
        assert_eq!(k.tokens, vec![9, 10, 11, 12, 13]);
        assert_eq!(k.depth, vec![0, 1, 2, 1, 2]);
        assert_eq!(k.children[0], vec![1, 3]);
        let row = |i: usize| k.ancestors[i * 5..(i + 1) * 5].to_vec();
        assert_eq!(row(2), vec![true, true, true, false, false]);
        assert_eq!(row(4), vec![true, false, false, true, true]);
        assert_eq!(t.max_depth(), 2);
    }
}

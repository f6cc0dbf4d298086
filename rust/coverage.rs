//! Do a tensor's boxes tile its global shape? The check that keeps a cut tensor from ever being
//! written: element counts must add up, no two boxes may overlap, and when a region is missing
//! (a rank's file left out, a piece the metadata never lists) the error names the tensor and the
//! region.

use crate::error::{Error, Result};
use crate::mmap::{numel, overflow};

/// Checks that boxes (`offsets`, `sizes`) of `tensor` tile `shape`: the element counts add up
/// to the tensor's and no two non-empty boxes overlap (pairwise for up to 4096 boxes).
pub fn check_coverage(tensor: &str, shape: &[u64], boxes: &[(&[u64], &[u64])]) -> Result<()> {
    let total = numel(tensor, shape)?;
    let mut sum = 0u64;
    for (_, s) in boxes {
        sum = sum
            .checked_add(numel(tensor, s)?)
            .ok_or_else(|| overflow(tensor))?;
    }
    let nonempty: Vec<_> = boxes
        .iter()
        .filter(|(_, s)| s.iter().all(|&x| x > 0))
        .collect();
    if nonempty.len() <= 4096 {
        for (i, a) in nonempty.iter().enumerate() {
            for b in &nonempty[i + 1..] {
                let overlap = (0..shape.len()).all(|k| {
                    let (a0, a1) = (a.0[k], a.0[k] + a.1[k]);
                    let (b0, b1) = (b.0[k], b.0[k] + b.1[k]);
                    a0 < b1 && b0 < a1
                });
                if overlap {
                    return Err(Error::shape(
                        tensor,
                        format!(
                            "chunks at offsets {:?} (sizes {:?}) and {:?} (sizes {:?}) overlap",
                            a.0, a.1, b.0, b.1
                        ),
                    ));
                }
            }
        }
    }
    if sum != total {
        let gap = match first_gap(shape, &nonempty) {
            Some((off, size)) => format!(
                "; no chunk holds the region at offsets {off:?} (sizes {size:?}), e.g. the shard \
                 of a rank whose file is missing"
            ),
            None => String::new(),
        };
        return Err(Error::shape(
            tensor,
            format!(
                "chunks hold {sum} elements but the shape {shape:?} has {total} \
                 (missing or overlapping chunks){gap}"
            ),
        ));
    }
    Ok(())
}

/// Most grid cells [`first_gap`] will look at (it gives up on finer tilings).
pub const MAX_GAP_CELLS: u64 = 1 << 20;

/// The first region of `shape` that no box covers, as (offsets, sizes), when the boxes do not
/// overlap. The box edges cut every dimension into intervals; each cell of that grid is either
/// inside one box or in none, so marking the cells each box covers finds an uncovered one
/// exactly. `None` when everything is covered or the grid would exceed [`MAX_GAP_CELLS`].
pub fn first_gap(shape: &[u64], boxes: &[&(&[u64], &[u64])]) -> Option<(Vec<u64>, Vec<u64>)> {
    if shape.contains(&0) {
        return None;
    }
    let mut edges: Vec<Vec<u64>> = shape.iter().map(|&n| vec![0, n]).collect();
    for (off, size) in boxes {
        for (d, e) in edges.iter_mut().enumerate() {
            e.push(off[d].min(shape[d]));
            e.push(off[d].saturating_add(size[d]).min(shape[d]));
        }
    }
    let mut cells = 1u64;
    for e in &mut edges {
        e.sort_unstable();
        e.dedup();
        cells = cells.checked_mul(e.len() as u64 - 1)?;
        if cells > MAX_GAP_CELLS {
            return None;
        }
    }
    let dims: Vec<usize> = edges.iter().map(|e| e.len() - 1).collect();
    let mut covered = vec![false; cells as usize];
    for (off, size) in boxes {
        // the range of cell indices the box spans in each dimension
        let span: Vec<(usize, usize)> = (0..shape.len())
            .map(|d| {
                let lo = edges[d].partition_point(|&x| x < off[d].min(shape[d]));
                let hi =
                    edges[d].partition_point(|&x| x < off[d].saturating_add(size[d]).min(shape[d]));
                (lo, hi)
            })
            .collect();
        mark(&mut covered, &dims, &span, 0, 0);
    }
    let first = covered.iter().position(|&c| !c)?;
    let (mut rest, mut off, mut size) = (first, vec![0; shape.len()], vec![0; shape.len()]);
    for d in (0..shape.len()).rev() {
        let i = rest % dims[d];
        rest /= dims[d];
        off[d] = edges[d][i];
        size[d] = edges[d][i + 1] - edges[d][i];
    }
    Some((off, size))
}

/// Marks the cells of `span` (row-major over `dims`), dimension `d` onwards, from `base`.
fn mark(covered: &mut [bool], dims: &[usize], span: &[(usize, usize)], d: usize, base: usize) {
    if d == dims.len() {
        covered[base] = true;
        return;
    }
    for i in span[d].0..span[d].1 {
        mark(covered, dims, span, d + 1, base * dims[d] + i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gap(shape: &[u64], boxes: &[(&[u64], &[u64])]) -> Option<(Vec<u64>, Vec<u64>)> {
        let refs: Vec<_> = boxes.iter().collect();
        first_gap(shape, &refs)
    }

    #[test]
    fn names_the_missing_region() {
        // rows 0-1 whole, rows 2-3 only columns 0-2: columns 3-5 of rows 2-3 are missing
        let boxes: [(&[u64], &[u64]); 2] = [(&[0, 0], &[2, 6]), (&[2, 0], &[2, 3])];
        assert_eq!(gap(&[4, 6], &boxes), Some((vec![2, 3], vec![2, 3])));
        let err = check_coverage("w", &[4, 6], &boxes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("'w'") || err.contains("w:"), "{err}");
        assert!(err.contains("offsets [2, 3] (sizes [2, 3])"), "{err}");
        // the last rank's rows missing
        let boxes: [(&[u64], &[u64]); 1] = [(&[0, 0], &[3, 6])];
        assert_eq!(gap(&[5, 6], &boxes), Some((vec![3, 0], vec![2, 6])));
        // complete: no gap, no error
        let boxes: [(&[u64], &[u64]); 2] = [(&[0, 0], &[3, 6]), (&[3, 0], &[2, 6])];
        assert_eq!(gap(&[5, 6], &boxes), None);
        assert!(check_coverage("w", &[5, 6], &boxes).is_ok());
    }

    proptest! {
        /// A grid tiling with one box left out: the gap found lies inside that box.
        #[test]
        fn gap_is_inside_the_removed_box(
            cuts0 in proptest::collection::btree_set(1u64..40, 0..5),
            cuts1 in proptest::collection::btree_set(1u64..40, 0..5),
            pick in 0usize..100,
        ) {
            let shape = [40u64, 40];
            let e0: Vec<u64> = std::iter::once(0).chain(cuts0).chain(std::iter::once(40)).collect();
            let e1: Vec<u64> = std::iter::once(0).chain(cuts1).chain(std::iter::once(40)).collect();
            let mut boxes: Vec<([u64; 2], [u64; 2])> = Vec::new();
            for a in e0.windows(2) {
                for b in e1.windows(2) {
                    boxes.push(([a[0], b[0]], [a[1] - a[0], b[1] - b[0]]));
                }
            }
            let removed = boxes.remove(pick % boxes.len());
            let views: Vec<(&[u64], &[u64])> =
                boxes.iter().map(|(o, s)| (&o[..], &s[..])).collect();
            let (off, size) = gap(&shape, &views).expect("a gap");
            for d in 0..2 {
                prop_assert!(off[d] >= removed.0[d]);
                prop_assert!(off[d] + size[d] <= removed.0[d] + removed.1[d]);
            }
            prop_assert!(check_coverage("t", &shape, &views).is_err());
        }
    }
}

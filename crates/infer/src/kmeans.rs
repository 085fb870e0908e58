//! Seeded k-means (Lloyd's iterations from k-means++ seeding) on rows of features: the fallback
//! grouping, run per class on the bias model's features.

use rand::Rng;

/// Lloyd iterations at most; it stops earlier once no assignment changes.
const MAX_ITERATIONS: usize = 50;

/// The cluster of each of the `points.len() / dim` rows, `0..k` (fewer clusters when there are
/// fewer distinct rows than `k`). Clusters are numbered by decreasing size, ties by first
/// member, so the result does not depend on the seeding order beyond the partition itself.
pub fn kmeans<R: Rng + ?Sized>(points: &[f32], dim: usize, k: usize, rng: &mut R) -> Vec<u8> {
    assert!(dim > 0 && points.len() % dim == 0, "rows of {dim} features");
    let n = points.len() / dim;
    if n == 0 {
        return Vec::new();
    }
    let row = |i: usize| &points[i * dim..(i + 1) * dim];
    let k = k.min(n).max(1);
    // k-means++: the first centre uniform, each next one with probability ~ squared distance.
    let mut centres: Vec<f32> = row(rng.random_range(0..n)).to_vec();
    let mut nearest: Vec<f64> = (0..n).map(|i| distance(row(i), &centres[..dim])).collect();
    while centres.len() / dim < k {
        let total: f64 = nearest.iter().sum();
        if total <= 0.0 {
            break; // every point sits on a centre: fewer distinct points than k
        }
        let mut target = rng.random_range(0.0..total);
        let mut pick = n - 1;
        for (i, &d) in nearest.iter().enumerate() {
            if target < d {
                pick = i;
                break;
            }
            target -= d;
        }
        let start = centres.len();
        centres.extend_from_slice(row(pick));
        for (i, d) in nearest.iter_mut().enumerate() {
            *d = d.min(distance(row(i), &centres[start..start + dim]));
        }
    }
    let k = centres.len() / dim;
    let mut assignment = vec![usize::MAX; n];
    for _ in 0..MAX_ITERATIONS {
        let mut changed = false;
        for (i, a) in assignment.iter_mut().enumerate() {
            let best = (0..k)
                .map(|c| (c, distance(row(i), &centres[c * dim..(c + 1) * dim])))
                .fold(
                    (0, f64::INFINITY),
                    |best, (c, d)| if d < best.1 { (c, d) } else { best },
                )
                .0;
            if *a != best {
                *a = best;
                changed = true;
            }
        }
        if !changed {
            break;
        }
        let mut sums = vec![0f64; k * dim];
        let mut counts = vec![0usize; k];
        for (i, &a) in assignment.iter().enumerate() {
            counts[a] += 1;
            for (s, &x) in sums[a * dim..(a + 1) * dim].iter_mut().zip(row(i)) {
                *s += f64::from(x);
            }
        }
        for c in 0..k {
            if counts[c] > 0 {
                for (centre, s) in centres[c * dim..(c + 1) * dim]
                    .iter_mut()
                    .zip(&sums[c * dim..(c + 1) * dim])
                {
                    *centre = (s / counts[c] as f64) as f32;
                }
            }
        }
    }
    renumber_by_size(&assignment, k)
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum()
}

/// Relabels clusters 0.. by decreasing size (ties: the one whose first member comes first);
/// empty clusters vanish.
fn renumber_by_size(assignment: &[usize], k: usize) -> Vec<u8> {
    let mut counts = vec![0usize; k];
    let mut first = vec![usize::MAX; k];
    for (i, &a) in assignment.iter().enumerate() {
        counts[a] += 1;
        first[a] = first[a].min(i);
    }
    let mut order: Vec<usize> = (0..k).filter(|&c| counts[c] > 0).collect();
    order.sort_by_key(|&c| (std::cmp::Reverse(counts[c]), first[c]));
    let mut new_id = vec![0u8; k];
    for (rank, &c) in order.iter().enumerate() {
        new_id[c] = rank as u8;
    }
    assignment.iter().map(|&a| new_id[a]).collect()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn separates_two_blobs_and_numbers_the_larger_first() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut points = Vec::new();
        for i in 0..30 {
            // 20 points near (0, 0), 10 near (10, 10), interleaved.
            let (cx, cy) = if i % 3 == 2 { (10.0, 10.0) } else { (0.0, 0.0) };
            points.push(cx + rng.random_range(-1.0..1.0f32));
            points.push(cy + rng.random_range(-1.0..1.0f32));
        }
        let labels = kmeans(&points, 2, 2, &mut rng);
        for (i, &l) in labels.iter().enumerate() {
            assert_eq!(l, u8::from(i % 3 == 2), "point {i}");
        }
    }

    #[test]
    fn fewer_distinct_points_than_k_gives_fewer_clusters() {
        let points = [1.0f32, 1.0, 1.0, 5.0];
        let labels = kmeans(&points, 1, 3, &mut ChaCha8Rng::seed_from_u64(0));
        assert_eq!(labels, vec![0, 0, 0, 1]);
    }
}

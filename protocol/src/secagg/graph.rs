//! The neighbour graph. With `k = n - 1` every pair of parties masks (Bonawitz et al.);
//! with smaller even `k` the graph is a Harary graph H(k, n) laid over a public random
//! permutation of the parties, as in SecAgg+ (Bell et al. 2020): each party masks with and
//! shares its secrets among `k` neighbours instead of everyone.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;

use super::PartyId;

/// Who masks with whom: each party's neighbours, symmetric (u neighbours v iff v neighbours
/// u). The complete graph for `k = n - 1`, else a Harary graph over a seeded permutation.
/// The aggregator holds every party's list ([`Graph::new`]); a party holds only its own
/// and its neighbours' ([`Graph::local`]), all it ever asks about, so that a party's memory
/// grows with `k²`, not with `n·k`.
#[derive(Debug, Clone)]
pub struct Graph {
    lists: Lists,
}

#[derive(Debug, Clone)]
enum Lists {
    /// Every party's neighbours, by party.
    All(Vec<Vec<PartyId>>),
    /// Some parties' neighbours (others have none here).
    Some(std::collections::BTreeMap<PartyId, Vec<PartyId>>),
}

/// The parties in the seeded order the Harary graph is laid over, and each party's place
/// in it; `None` for the complete graph.
fn placement(n: usize, k: usize, seed: u64) -> Option<(Vec<PartyId>, Vec<usize>)> {
    if k + 1 >= n {
        return None;
    }
    let mut order: Vec<PartyId> = (0..n as PartyId).collect();
    order.shuffle(&mut ChaCha20Rng::seed_from_u64(seed));
    let mut place = vec![0; n];
    for (pos, &u) in order.iter().enumerate() {
        place[u as usize] = pos;
    }
    Some((order, place))
}

/// `u`'s neighbours, sorted: everyone else in the complete graph, else the `k/2` parties on
/// each side of `u` in `order`.
fn list_of(
    u: PartyId,
    n: usize,
    k: usize,
    placed: Option<&(Vec<PartyId>, Vec<usize>)>,
) -> Vec<PartyId> {
    let mut list: Vec<PartyId> = match placed {
        None => (0..n as PartyId).filter(|&v| v != u).collect(),
        Some((order, place)) => {
            let pos = place[u as usize];
            (1..=k / 2)
                .flat_map(|j| [order[(pos + j) % n], order[(pos + n - j) % n]])
                .collect()
        }
    };
    list.sort_unstable();
    list.dedup();
    list
}

impl Graph {
    /// The graph for `n` parties with `k` neighbours each; `seed` fixes the permutation.
    /// The caller has validated `k` (see `Setup::validate`).
    pub fn new(n: usize, k: usize, seed: u64) -> Graph {
        let k = k.min(n.saturating_sub(1));
        let placed = placement(n, k, seed);
        Graph {
            lists: Lists::All(
                (0..n as PartyId)
                    .map(|u| list_of(u, n, k, placed.as_ref()))
                    .collect(),
            ),
        }
    }

    /// The same graph as [`Graph::new`], as party `me` needs it: its own neighbours and
    /// theirs. Asked about any other party, it says it has no neighbours.
    pub fn local(n: usize, k: usize, seed: u64, me: PartyId) -> Graph {
        if me as usize >= n {
            // Not a party: no neighbours (callers validate `me` first).
            return Graph {
                lists: Lists::Some(std::collections::BTreeMap::new()),
            };
        }
        let k = k.min(n.saturating_sub(1));
        let placed = placement(n, k, seed);
        let mine = list_of(me, n, k, placed.as_ref());
        let mut lists = std::collections::BTreeMap::new();
        for &v in &mine {
            lists.insert(v, list_of(v, n, k, placed.as_ref()));
        }
        lists.insert(me, mine);
        Graph {
            lists: Lists::Some(lists),
        }
    }

    /// `u`'s neighbours, in increasing order.
    pub fn neighbours(&self, u: PartyId) -> &[PartyId] {
        match &self.lists {
            Lists::All(all) => all.get(u as usize).map_or(&[], Vec::as_slice),
            Lists::Some(some) => some.get(&u).map_or(&[], Vec::as_slice),
        }
    }

    /// Whether `u` and `v` mask with each other.
    pub fn are_neighbours(&self, u: PartyId, v: PartyId) -> bool {
        self.neighbours(u).binary_search(&v).is_ok()
    }

    /// The holders of `owner`'s shares: its neighbours and itself, in increasing order.
    pub fn holders(&self, owner: PartyId) -> Vec<PartyId> {
        let mut h = self.neighbours(owner).to_vec();
        if let Err(i) = h.binary_search(&owner) {
            h.insert(i, owner);
        }
        h
    }

    /// The Shamir x-coordinate of the share of `owner`'s secrets held by `holder` (its
    /// position among [`Graph::holders`], from 1).
    pub fn share_index(&self, owner: PartyId, holder: PartyId) -> Option<u8> {
        if owner != holder && !self.are_neighbours(owner, holder) {
            return None;
        }
        let before = self.neighbours(owner).partition_point(|&v| v < holder);
        let own = usize::from(owner < holder);
        u8::try_from(before + own + 1).ok()
    }
}

fn ln_choose(n: usize, k: usize) -> f64 {
    (1..=k)
        .map(|i| ((n - k + i) as f64).ln() - (i as f64).ln())
        .sum()
}

/// P[X >= at_least] for X ~ Binomial(n, p).
fn binomial_tail(n: usize, p: f64, at_least: usize) -> f64 {
    if p <= 0.0 {
        return if at_least == 0 { 1.0 } else { 0.0 };
    }
    if p >= 1.0 {
        return if at_least <= n { 1.0 } else { 0.0 };
    }
    (at_least..=n)
        .map(|i| (ln_choose(n, i) + i as f64 * p.ln() + (n - i) as f64 * (1.0 - p).ln()).exp())
        .sum()
}

/// Chooses neighbours `k` and threshold `t` for `n` parties so that, when each party drops
/// out independently with probability `dropout` and is corrupt (colludes with the server)
/// independently with probability `corrupt`:
/// - P[some party's secrets cannot be rebuilt (fewer than t of its k neighbours survive;
///   its own share counts only if it survives itself)]
///   <= n * P[Bin(k, dropout) > k - t] <= 2^-`correctness_bits`, and
/// - P[some neighbourhood holds enough corrupt parties to unmask a party with a server that
///   lies about dropouts, 2t - (k + 1) or more] <= n * P[Bin(k, corrupt) >= 2t - k - 1]
///   <= 2^-`privacy_bits`.
///
/// Returns the smallest even `k` that meets both (with the smallest such `t`), or, when no
/// smaller graph does, the widest allowed (`k = min(n - 1, 254)`) with a two-thirds
/// threshold.
pub fn choose_neighbours(
    n: usize,
    dropout: f64,
    corrupt: f64,
    correctness_bits: u32,
    privacy_bits: u32,
) -> (u32, u32) {
    // At most 254 neighbours (the share x-coordinates are bytes), and a complete graph for
    // small n; without a fitting neighbourhood, the widest allowed with a two-thirds
    // threshold.
    let widest = |n: usize| {
        let k = if n - 1 <= 254 { n - 1 } else { 254 };
        (k as u32, ((2 * (k + 1)) / 3 + 1).min(k + 1) as u32)
    };
    if n < 4 {
        return widest(n);
    }
    let correct_target = 2f64.powi(-(correctness_bits as i32)) / n as f64;
    let private_target = 2f64.powi(-(privacy_bits as i32)) / n as f64;
    let mut k = 2;
    while k < n - 1 && k <= 254 {
        // More than half of the k + 1 holders.
        for t in (k.div_ceil(2) + 1)..=k {
            let unrecoverable = binomial_tail(k, dropout, k - t + 1);
            // A server that lies about dropouts unmasks a party when its accomplices hold
            // c >= 2t - (k + 1) of the party's shares (see `Setup::check_collusion_margin`).
            let exposed = binomial_tail(k, corrupt, 2 * t - k - 1);
            if unrecoverable <= correct_target && exposed <= private_target {
                return (k as u32, t as u32);
            }
        }
        k += 2;
    }
    widest(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partys_local_graph_is_its_part_of_the_whole() {
        for (n, k) in [(10, 9), (101, 10), (1000, 30)] {
            let g = Graph::new(n, k, 7);
            for me in [0, 1, (n / 2) as PartyId, (n - 1) as PartyId] {
                let local = Graph::local(n, k, 7, me);
                assert_eq!(local.neighbours(me), g.neighbours(me));
                for &v in g.neighbours(me) {
                    assert_eq!(local.neighbours(v), g.neighbours(v));
                    assert_eq!(local.share_index(v, me), g.share_index(v, me));
                    assert_eq!(local.share_index(me, v), g.share_index(me, v));
                }
                assert_eq!(local.holders(me), g.holders(me));
            }
        }
    }

    #[test]
    fn harary_graph_is_symmetric_and_regular() {
        for (n, k) in [(10, 4), (101, 10), (1000, 30)] {
            let g = Graph::new(n, k, 7);
            for u in 0..n as PartyId {
                assert_eq!(g.neighbours(u).len(), k, "party {u}");
                assert!(!g.are_neighbours(u, u));
                for &v in g.neighbours(u) {
                    assert!(g.are_neighbours(v, u), "{u} -> {v} not symmetric");
                }
            }
        }
        let complete = Graph::new(5, 4, 0);
        assert_eq!(complete.neighbours(2), &[0, 1, 3, 4]);
        assert_eq!(complete.holders(2), vec![0, 1, 2, 3, 4]);
        assert_eq!(complete.share_index(2, 3), Some(4));
        assert_eq!(complete.share_index(2, 2), Some(3));
        let g = Graph::new(101, 10, 7);
        for u in [0, 50, 100] {
            for (i, h) in g.holders(u).into_iter().enumerate() {
                assert_eq!(g.share_index(u, h), Some(i as u8 + 1));
            }
            let stranger = (0..101)
                .find(|v| *v != u && !g.are_neighbours(u, *v))
                .unwrap();
            assert_eq!(g.share_index(u, stranger), None);
        }
    }

    #[test]
    fn binomial_tails_by_hand() {
        assert!((binomial_tail(2, 0.5, 1) - 0.75).abs() < 1e-12);
        assert!((binomial_tail(3, 0.1, 3) - 0.001).abs() < 1e-12);
        assert!((binomial_tail(10, 0.3, 0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn neighbourhoods_grow_like_log_n() {
        let (k100, t100) = choose_neighbours(100, 0.1, 0.05, 20, 30);
        let (k1000, _) = choose_neighbours(1000, 0.1, 0.05, 20, 30);
        let (k10000, _) = choose_neighbours(10_000, 0.1, 0.05, 20, 30);
        assert!(k100 < 99 && t100 > k100 / 2, "{k100} {t100}");
        assert!(k1000 < 100 && k10000 < 120, "{k1000} {k10000}");
        assert!(
            k10000 - k1000 <= k1000 - k100 + 6,
            "{k100} {k1000} {k10000}: not logarithmic"
        );
        // Too few parties for a partial graph: complete, with a two-thirds threshold.
        assert_eq!(choose_neighbours(3, 0.1, 0.05, 20, 30), (2, 3));
        for n in [100, 1000, 10_000] {
            let (k, t) = choose_neighbours(n, 0.1, 0.05, 20, 30);
            eprintln!("n = {n}: k = {k}, t = {t}");
        }
    }

    #[test]
    fn never_more_than_254_neighbours() {
        // Every party corrupt with probability 0.5: nothing fits; the widest graph allowed.
        let (k, t) = choose_neighbours(1000, 0.1, 0.5, 20, 30);
        assert_eq!((k, t), (254, 171));
        assert_eq!(choose_neighbours(200, 0.1, 0.5, 20, 30), (199, 134));
    }
}

//! Sets of integers as sorted, disjoint, inclusive ranges: the algebra behind address and
//! port sets in both compilers (union, intersection, difference, minimal CIDR covers).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A set of `u128` values within `0..=max`, kept as sorted disjoint inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct IntervalSet {
    ranges: Vec<(u128, u128)>,
}

impl IntervalSet {
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn range(first: u128, last: u128) -> Self {
        debug_assert!(first <= last);
        IntervalSet {
            ranges: vec![(first, last)],
        }
    }

    /// The union of any ranges. Sorting input that is already in order costs one pass.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u128, u128)>) -> Self {
        let mut ranges: Vec<_> = ranges.into_iter().collect();
        ranges.sort_unstable();
        Self::from_ordered(ranges)
    }

    /// The union of ranges given in order of their first values: one pass, nothing sorted.
    pub fn from_ordered(ranges: impl IntoIterator<Item = (u128, u128)>) -> Self {
        let ranges = ranges.into_iter();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.size_hint().0);
        for range in ranges {
            debug_assert!(merged.last().is_none_or(|last| last.0 <= range.0));
            push_merging(&mut merged, range);
        }
        IntervalSet { ranges: merged }
    }

    pub fn ranges(&self) -> &[(u128, u128)] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn contains(&self, value: u128) -> bool {
        let i = self.ranges.partition_point(|&(_, last)| last < value);
        self.ranges.get(i).is_some_and(|&(first, _)| first <= value)
    }

    pub fn union(&self, other: &Self) -> Self {
        // Both lists are in order: merging them keeps it, in one pass.
        let (a, b) = (&self.ranges, &other.ranges);
        let (mut i, mut j) = (0, 0);
        let mut merged = Vec::with_capacity(a.len() + b.len());
        while i < a.len() || j < b.len() {
            let next = if j == b.len() || (i < a.len() && a[i] <= b[j]) {
                i += 1;
                a[i - 1]
            } else {
                j += 1;
                b[j - 1]
            };
            push_merging(&mut merged, next);
        }
        IntervalSet { ranges: merged }
    }

    pub fn intersect(&self, other: &Self) -> Self {
        let (mut i, mut j, mut out) = (0, 0, Vec::new());
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a, b) = (self.ranges[i], other.ranges[j]);
            let (first, last) = (a.0.max(b.0), a.1.min(b.1));
            if first <= last {
                out.push((first, last));
            }
            if a.1 < b.1 { i += 1 } else { j += 1 }
        }
        IntervalSet { ranges: out }
    }

    /// Everything in `0..=max` not in this set.
    pub fn complement(&self, max: u128) -> Self {
        let mut out = Vec::new();
        let mut next = Some(0u128);
        for &(first, last) in &self.ranges {
            if let Some(n) = next
                && n < first
            {
                out.push((n, first - 1));
            }
            next = last.checked_add(1);
        }
        if let Some(n) = next
            && n <= max
        {
            out.push((n, max));
        }
        IntervalSet { ranges: out }
    }

    pub fn difference(&self, other: &Self) -> Self {
        let max = self.ranges.last().map_or(0, |r| r.1);
        self.intersect(&other.complement(max))
    }

    pub fn is_subset(&self, other: &Self) -> bool {
        self.difference(other).is_empty()
    }

    /// The smallest value in the set.
    pub fn first(&self) -> Option<u128> {
        self.ranges.first().map(|r| r.0)
    }
}

/// Appends a range to ranges in order, merged with the last one when they touch or overlap.
fn push_merging(ranges: &mut Vec<(u128, u128)>, (first, last): (u128, u128)) {
    match ranges.last_mut() {
        Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
        _ => ranges.push((first, last)),
    }
}

/// Splits `first..=last` into the fewest aligned blocks (CIDR prefixes) of a `bits`-wide space.
fn aligned_blocks(mut first: u128, last: u128, bits: u32) -> Vec<(u128, u32)> {
    // Last value of the block of `host` host bits that starts at the aligned `first`.
    let block_end = |first: u128, host: u32| {
        if host == 128 {
            u128::MAX
        } else {
            first | ((1u128 << host) - 1)
        }
    };
    let mut out = Vec::new();
    loop {
        let mut host = first.trailing_zeros().min(bits);
        while host > 0 && block_end(first, host) > last {
            host -= 1;
        }
        out.push((first, bits - host));
        let end = block_end(first, host);
        if end >= last {
            return out;
        }
        first = end + 1;
    }
}

/// A set of IP addresses of both families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct IpSet {
    pub v4: IntervalSet,
    pub v6: IntervalSet,
}

const V4_MAX: u128 = u32::MAX as u128;
const V6_MAX: u128 = u128::MAX;

impl IpSet {
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn all() -> Self {
        IpSet {
            v4: IntervalSet::range(0, V4_MAX),
            v6: IntervalSet::range(0, V6_MAX),
        }
    }

    pub fn from_net(net: IpNet) -> Self {
        match net {
            IpNet::V4(n) => IpSet {
                v4: IntervalSet::range(
                    u32::from(n.network()) as u128,
                    u32::from(n.broadcast()) as u128,
                ),
                v6: IntervalSet::empty(),
            },
            IpNet::V6(n) => IpSet {
                v4: IntervalSet::empty(),
                v6: IntervalSet::range(u128::from(n.network()), u128::from(n.broadcast())),
            },
        }
    }

    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for net in nets {
            let s = Self::from_net(net);
            v4.extend_from_slice(s.v4.ranges());
            v6.extend_from_slice(s.v6.ranges());
        }
        IpSet {
            v4: IntervalSet::from_ranges(v4),
            v6: IntervalSet::from_ranges(v6),
        }
    }

    pub fn from_ips(ips: impl IntoIterator<Item = IpAddr>) -> Self {
        Self::from_nets(ips.into_iter().map(IpNet::from))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.contains(u32::from(a) as u128),
            IpAddr::V6(a) => self.v6.contains(u128::from(a)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn is_all(&self) -> bool {
        *self == Self::all()
    }

    pub fn union(&self, o: &Self) -> Self {
        IpSet {
            v4: self.v4.union(&o.v4),
            v6: self.v6.union(&o.v6),
        }
    }

    pub fn intersect(&self, o: &Self) -> Self {
        IpSet {
            v4: self.v4.intersect(&o.v4),
            v6: self.v6.intersect(&o.v6),
        }
    }

    pub fn complement(&self) -> Self {
        IpSet {
            v4: self.v4.complement(V4_MAX),
            v6: self.v6.complement(V6_MAX),
        }
    }

    pub fn difference(&self, o: &Self) -> Self {
        self.intersect(&o.complement())
    }

    pub fn is_subset(&self, o: &Self) -> bool {
        self.difference(o).is_empty()
    }

    /// The fewest CIDR blocks whose union is exactly this set, IPv4 first.
    pub fn to_cidrs(&self) -> Vec<IpNet> {
        let v4 = self
            .v4
            .ranges()
            .iter()
            .flat_map(|&(a, b)| aligned_blocks(a, b, 32))
            .map(|(start, len)| {
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from(start as u32), len as u8).unwrap())
            });
        let v6 = self
            .v6
            .ranges()
            .iter()
            .flat_map(|&(a, b)| aligned_blocks(a, b, 128))
            .map(|(start, len)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(start), len as u8).unwrap()));
        v4.chain(v6).collect()
    }

    /// Some address in the set (IPv4 first), for example flows.
    pub fn sample(&self) -> Option<IpAddr> {
        self.v4
            .first()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v as u32)))
            .or_else(|| self.v6.first().map(|v| IpAddr::V6(Ipv6Addr::from(v))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_cover_is_minimal_and_exact() {
        let s = IpSet::from_net(net("10.0.0.0/8")).difference(&IpSet::from_net(net("10.1.0.0/16")));
        let cidrs = s.to_cidrs();
        assert_eq!(cidrs.len(), 8);
        assert_eq!(IpSet::from_nets(cidrs), s);
        assert_eq!(IpSet::all().to_cidrs(), vec![net("0.0.0.0/0"), net("::/0")]);
    }

    fn arb_set() -> impl Strategy<Value = IntervalSet> {
        prop::collection::vec((0u128..200, 0u128..20), 0..6)
            .prop_map(|v| IntervalSet::from_ranges(v.into_iter().map(|(a, l)| (a, a + l))))
    }

    proptest! {
        #[test]
        fn set_algebra_matches_membership(a in arb_set(), b in arb_set(), x in 0u128..230) {
            prop_assert_eq!(a.union(&b).contains(x), a.contains(x) || b.contains(x));
            // One form per set: the merge gives what sorting both lists gives.
            let sorted = IntervalSet::from_ranges(a.ranges().iter().chain(b.ranges()).copied());
            prop_assert_eq!(a.union(&b), sorted);
            prop_assert_eq!(a.intersect(&b).contains(x), a.contains(x) && b.contains(x));
            prop_assert_eq!(a.difference(&b).contains(x), a.contains(x) && !b.contains(x));
            prop_assert_eq!(a.complement(250).contains(x), !a.contains(x));
        }

        #[test]
        fn cidr_cover_round_trips(a in arb_set()) {
            let s = IpSet { v4: a.clone(), v6: a };
            prop_assert_eq!(IpSet::from_nets(s.to_cidrs()), s);
        }
    }
}

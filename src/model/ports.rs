use std::fmt;
use std::str::FromStr;

/// An inclusive port range; `*` is `0-65535`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: 65535,
    };

    pub fn new(first: u16, last: u16) -> Self {
        debug_assert!(first <= last);
        PortRange { first, last }
    }

    pub fn is_all(&self) -> bool {
        *self == Self::ALL
    }

    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(Self::ALL);
        }
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number (0-65535)"))
        };
        match s.split_once('-') {
            None => port(s).map(|p| PortRange::new(p, p)),
            Some((a, b)) => {
                let (first, last) = (port(a)?, port(b)?);
                if first > last {
                    return Err(format!("range {s:?} is reversed (start must be <= end)"));
                }
                Ok(PortRange::new(first, last))
            }
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            write!(f, "*")
        } else if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_azure_port_syntax() {
        assert_eq!("*".parse(), Ok(PortRange::ALL));
        assert_eq!("80".parse(), Ok(PortRange::new(80, 80)));
        assert_eq!("10000-10005".parse(), Ok(PortRange::new(10000, 10005)));
        assert_eq!("0-65535".parse::<PortRange>().map(|p| p.is_all()), Ok(true));
        assert!(
            "90-80"
                .parse::<PortRange>()
                .unwrap_err()
                .contains("reversed")
        );
        assert!("65536".parse::<PortRange>().is_err());
        assert!("http".parse::<PortRange>().is_err());
    }
}

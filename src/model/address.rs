use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// One entry of `sourceAddressPrefix(es)` / `destinationAddressPrefix(es)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum AddressPrefix {
    /// `*`, `Any`, `0.0.0.0/0` or `::/0`: every address of both families, as in Azure.
    Any,
    /// An address or CIDR block, IPv4 or IPv6 (an address is its /32 or /128).
    Net(IpNet),
    /// A service tag: a built-in one or the name of a `ServiceTag` object.
    Tag(String),
}

/// The service tags every cluster has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum WellKnownTag {
    /// The cluster address space: configured ranges, every pod IP and every node IP.
    VirtualNetwork,
    /// Every address outside `VirtualNetwork`.
    Internet,
    /// Where health probes come from: the node IPs.
    AzureLoadBalancer,
}

impl WellKnownTag {
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::VirtualNetwork,
            Self::Internet,
            Self::AzureLoadBalancer,
        ]
        .into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::VirtualNetwork => "VirtualNetwork",
            Self::Internet => "Internet",
            Self::AzureLoadBalancer => "AzureLoadBalancer",
        }
    }
}

/// Whether `name` can name a service tag (Azure tags look like `Storage.WestEurope`).
pub fn is_tag_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && name.len() <= 80
}

impl FromStr for AddressPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" || s.eq_ignore_ascii_case("any") {
            return Ok(Self::Any);
        }
        if let Ok(net) = s.parse::<IpNet>() {
            if net.prefix_len() == 0 {
                return Ok(Self::Any);
            }
            if net.trunc() != net {
                return Err(format!(
                    "{s:?} has host bits set; the network is {}",
                    net.trunc()
                ));
            }
            return Ok(Self::Net(net));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self::Net(IpNet::from(ip)));
        }
        if s.contains('/')
            || s.contains(':')
            || s.chars().next().is_some_and(|c| c.is_ascii_digit())
        {
            return Err(format!("{s:?} is not a valid IP address or CIDR block"));
        }
        if is_tag_name(s) {
            return Ok(Self::Tag(s.to_string()));
        }
        Err(format!(
            "{s:?} is neither '*', an IP address, a CIDR block nor a service tag name"
        ))
    }
}

impl fmt::Display for AddressPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => write!(f, "*"),
            Self::Net(net) => write!(f, "{net}"),
            Self::Tag(tag) => write!(f, "{tag}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<AddressPrefix, String> {
        s.parse()
    }

    #[test]
    fn parses_azure_address_syntax() {
        assert_eq!(p("*"), Ok(AddressPrefix::Any));
        assert_eq!(p("Any"), Ok(AddressPrefix::Any));
        assert_eq!(p("0.0.0.0/0"), Ok(AddressPrefix::Any));
        assert_eq!(p("::/0"), Ok(AddressPrefix::Any));
        assert_eq!(
            p("10.0.0.0/8"),
            Ok(AddressPrefix::Net("10.0.0.0/8".parse().unwrap()))
        );
        assert_eq!(
            p("10.0.2.4"),
            Ok(AddressPrefix::Net("10.0.2.4/32".parse().unwrap()))
        );
        assert_eq!(
            p("fd00::1"),
            Ok(AddressPrefix::Net("fd00::1/128".parse().unwrap()))
        );
        assert_eq!(
            p("Storage.WestEurope"),
            Ok(AddressPrefix::Tag("Storage.WestEurope".into()))
        );
        assert!(p("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(p("10.0.0.0/33").unwrap_err().contains("not a valid"));
        assert!(p("300.1.1.1").is_err());
        assert!(p("bad tag!").is_err());
    }

    #[test]
    fn well_known_tags_are_case_insensitive() {
        assert_eq!(
            WellKnownTag::parse("virtualnetwork"),
            Some(WellKnownTag::VirtualNetwork)
        );
        assert_eq!(
            WellKnownTag::parse("INTERNET"),
            Some(WellKnownTag::Internet)
        );
        assert_eq!(WellKnownTag::parse("Storage"), None);
    }
}

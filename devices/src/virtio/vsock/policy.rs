//! Which vsock flows the operator allows: rules `from` a (CID, port) `to` a (CID, port), each
//! side exact or `*`. A connection request whose flow no rule allows is refused before the CMM
//! offers any key; one that a rule allows becomes a LISTEN entry for the destination port,
//! whose allowed peer is the requester (claims 1 and 8).

use std::fmt;
use std::str::FromStr;

/// One side of a rule: a CID and a port, either of them any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    /// The CID, or any.
    pub cid: Option<u32>,
    /// The port, or any.
    pub port: Option<u32>,
}

/// A flow the operator allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Who may connect.
    pub from: Pattern,
    /// To what.
    pub to: Pattern,
}

/// Every allowed flow; nothing else is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// The rules, any of which allows a flow.
    pub rules: Vec<Rule>,
}

impl Pattern {
    fn matches(&self, cid: u32, port: u32) -> bool {
        self.cid.is_none_or(|c| c == cid) && self.port.is_none_or(|p| p == port)
    }
}

impl Policy {
    /// Whether `(from_cid, from_port)` may connect to `(to_cid, to_port)`.
    pub fn allows(&self, from: (u32, u32), to: (u32, u32)) -> bool {
        self.rules.iter().any(|r| r.from.matches(from.0, from.1) && r.to.matches(to.0, to.1))
    }
}

/// Why a pattern did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPattern(String);

impl fmt::Display for BadPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not \"CID:PORT\" (each a number or *) or \"*\"", self.0)
    }
}

impl std::error::Error for BadPattern {}

impl FromStr for Pattern {
    type Err = BadPattern;

    /// `"*"`, or `"CID:PORT"` where each is a number or `*`.
    fn from_str(text: &str) -> Result<Self, BadPattern> {
        let bad = || BadPattern(text.to_owned());
        if text.trim() == "*" {
            return Ok(Self { cid: None, port: None });
        }
        let (cid, port) = text.split_once(':').ok_or_else(bad)?;
        let part = |p: &str| match p.trim() {
            "*" => Ok(None),
            n => n.parse::<u32>().map(Some).map_err(|_| bad()),
        };
        Ok(Self { cid: part(cid)?, port: part(port)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(from: &str, to: &str) -> Rule {
        Rule { from: from.parse().unwrap(), to: to.parse().unwrap() }
    }

    #[test]
    fn a_flow_is_allowed_only_by_a_rule() {
        let policy = Policy { rules: vec![rule("3:*", "4:5000"), rule("*", "5:22")] };
        assert!(policy.allows((3, 1024), (4, 5000)));
        assert!(!policy.allows((3, 1024), (4, 5001)), "another port");
        assert!(!policy.allows((6, 1024), (4, 5000)), "another source");
        assert!(policy.allows((9, 7), (5, 22)), "anyone to 5:22");
        assert!(!Policy::default().allows((3, 1), (4, 1)), "nothing without rules");
    }

    #[test]
    fn patterns_parse_strictly() {
        assert_eq!("*".parse::<Pattern>(), Ok(Pattern { cid: None, port: None }));
        assert_eq!("3:*".parse::<Pattern>(), Ok(Pattern { cid: Some(3), port: None }));
        assert_eq!("*:80".parse::<Pattern>(), Ok(Pattern { cid: None, port: Some(80) }));
        for bad in ["", "3", "3:", "x:1", "3:1:2", "-1:1"] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad:?}");
        }
    }
}

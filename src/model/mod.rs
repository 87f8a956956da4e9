//! The NSG model: rules, addresses, ports, groups and the objects they apply to.
//!
//! Pure: nothing here knows about Kubernetes clients. The API types in `crate::api`
//! convert into these types, and every evaluator and compiler works on them.

mod address;
mod error;
mod intervals;
mod inventory;
mod ports;
mod rule;
mod selector;

pub use address::{AddressPrefix, WellKnownTag};
pub use error::{ValidationError, ValidationErrors};
pub use intervals::{IntervalSet, IpSet};
pub use inventory::{Asg, Inventory, NAMESPACE_NAME_LABEL, Namespace, ObjectRef, Pod, ServiceTag};
pub use ports::PortRange;
pub use rule::{
    Access, AsgRef, Direction, Endpoint, Nsg, Protocol, RuleLimits, SecurityRule, default_rules,
};
pub use selector::{LabelSelector, Operator, Requirement};

/// Annotation by which a pod declares its ASG memberships, as a NIC lists its ASGs.
pub const ASG_ANNOTATION: &str = "kubensg.io/application-security-groups";
/// Prefix of the membership labels the controller maintains (`asg.kubensg.io/<asg>`).
pub const ASG_LABEL_PREFIX: &str = "asg.kubensg.io/";
/// Label naming the NIC-level NSG a pod is bound to.
pub const NIC_NSG_LABEL: &str = "kubensg.io/nic-nsg";

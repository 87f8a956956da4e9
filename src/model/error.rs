use std::fmt;

/// One problem with one field of one object, named so a user can find it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ValidationError {
    /// `Kind namespace/name`.
    pub object: String,
    /// The security rule, when the problem is inside one.
    pub rule: Option<String>,
    /// JSON path of the field, e.g. `spec.securityRules[2].priority`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.object)?;
        if let Some(rule) = &self.rule {
            write!(f, " rule {rule:?}")?;
        }
        write!(f, ": {}: {}", self.field, self.message)
    }
}

/// Every problem found in one object; validation reports them all, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

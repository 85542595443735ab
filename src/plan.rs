//! The configured views as the database knows them, and the order they refresh in.
//!
//! [`Plan::load`] resolves every `[[view]]` in the catalog, checks that it can be refreshed in
//! its mode (a usable unique index for `concurrently`, the function for `incremental`,
//! ownership), discovers which configured views read which (`pg_depend` over the views'
//! rewrite rules, through plain views), lets `depends_on` replace that, and sorts them
//! topologically. A cycle is an error naming its views.

use std::collections::BTreeSet;

use tokio_postgres::GenericClient;

use crate::config::{Config, Mode, ViewConfig};
use crate::sql::{ident, Relation};

/// A problem that keeps a view from being refreshed, with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub view: String,
    pub message: String,
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "view {}: {} (fix: {})",
            self.view, self.message, self.fix
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Problems(Vec<Problem>),
    #[error(
        "the views depend on each other in a cycle: {0}; fix: set `depends_on` on one of them"
    )]
    Cycle(String),
    #[error("mvrefresh's schema is not installed in this database (no table mvrefresh.meta); fix: run `mvrefresh install`")]
    NotInstalled,
    #[error("mvrefresh's schema in this database is version {installed}, this binary needs version {}; fix: run `mvrefresh install` (it upgrades in place; nothing pending is lost)", crate::install::SCHEMA_VERSION)]
    Outdated { installed: String },
    #[error("{}", crate::db::error_text(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// One configured view, resolved.
#[derive(Debug, Clone)]
pub struct View {
    /// The name used in the change log, history, logs and metrics (the configured name).
    pub name: String,
    pub config: ViewConfig,
    /// The quoted, schema-qualified relation.
    pub target: String,
    /// The quoted, schema-qualified refresh function (`incremental` only).
    pub function: Option<String>,
    /// The source, key and unique columns (`partitioned` only).
    pub partition: Option<crate::partition::Partition>,
    pub populated: bool,
    /// Indexes (into [`Plan::views`]) of the views this one reads.
    pub depends_on: Vec<usize>,
    /// Every view this one reads, directly or not.
    pub ancestors: BTreeSet<usize>,
    /// The views that read this one directly.
    pub dependents: Vec<usize>,
}

impl View {
    pub fn mode(&self) -> Mode {
        self.config.mode
    }
}

/// Every configured view, resolved, with its refresh order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub views: Vec<View>,
    /// Indexes into `views`, dependencies first.
    pub order: Vec<usize>,
}

/// A view as [`check_view`] found it.
struct Checked {
    resolved: Resolved,
    function: Option<String>,
    partition: Option<crate::partition::Partition>,
}

struct Resolved {
    oid: u32,
    target: String,
    relkind: i8,
    populated: bool,
    owner: bool,
}

impl Plan {
    /// Resolves and checks every view. All problems are reported together.
    pub async fn load(client: &impl GenericClient, config: &Config) -> Result<Plan, PlanError> {
        match crate::store::installed_version(client).await? {
            None => return Err(PlanError::NotInstalled),
            Some(v) if v != crate::install::SCHEMA_VERSION => {
                return Err(PlanError::Outdated { installed: v })
            }
            Some(_) => {}
        }
        let mut problems = Vec::new();
        let mut resolved = Vec::new();
        for v in &config.views {
            let (r, found) = check_view(client, v).await?;
            problems.extend(found);
            resolved.push(r);
        }
        if !problems.is_empty() {
            return Err(PlanError::Problems(problems));
        }
        let resolved: Vec<Checked> = resolved.into_iter().flatten().collect();
        let oids: Vec<u32> = resolved.iter().map(|c| c.resolved.oid).collect();
        // A partitioned view reads what its source reads.
        let roots: Vec<u32> = resolved
            .iter()
            .map(|c| {
                c.partition
                    .as_ref()
                    .map_or(c.resolved.oid, |p| p.source_oid)
            })
            .collect();
        let mut depends_on = catalog_dependencies(client, &roots, &oids).await?;
        let canonical: Vec<String> = config
            .views
            .iter()
            .map(|v| v.relation().canonical())
            .collect();
        for (i, v) in config.views.iter().enumerate() {
            if let Some(deps) = &v.depends_on {
                // Validated at load: every entry names a configured view.
                depends_on[i] = deps
                    .iter()
                    .filter_map(|r| canonical.iter().position(|c| *c == r.canonical()))
                    .collect();
            }
        }
        // Each view's name as recorded: the relation the catalog resolved, however configured.
        let names = crate::store::recorded_names(client, &config.views).await?;
        for (i, name) in names.iter().enumerate() {
            if let Some(j) = names[..i].iter().position(|n| n == name) {
                problems.push(Problem {
                    view: config.views[i].name.to_string(),
                    message: format!(
                        "is the same relation as view[{j}] (`{}`)",
                        config.views[j].name
                    ),
                    fix: "configure each view once".into(),
                });
            }
        }
        if !problems.is_empty() {
            return Err(PlanError::Problems(problems));
        }
        let order = topo_order(&names, &depends_on)?;
        let views = config
            .views
            .iter()
            .zip(resolved)
            .enumerate()
            .map(|(i, (cfg, c))| View {
                name: names[i].clone(),
                config: cfg.clone(),
                target: c.resolved.target,
                function: c.function,
                partition: c.partition,
                populated: c.resolved.populated,
                depends_on: depends_on[i].iter().copied().collect(),
                ancestors: BTreeSet::new(),
                dependents: Vec::new(),
            })
            .collect();
        Ok(Plan {
            views: link(views, &order),
            order,
        })
    }

    /// The names of the views that read view `i` directly: a refresh of `i` makes its keys
    /// pending for them.
    pub fn dependent_names(&self, i: usize) -> Vec<String> {
        self.views[i]
            .dependents
            .iter()
            .map(|&d| self.views[d].name.clone())
            .collect()
    }

    /// The view `name` designates: its recorded name, or as configured.
    pub fn index(&self, name: &str) -> Option<usize> {
        let want = Relation::parse(name).ok()?;
        self.views
            .iter()
            .position(|v| v.name == name || *v.config.relation() == want)
    }

    /// `a → b → c` lines for the check report.
    pub fn describe_order(&self) -> String {
        self.order
            .iter()
            .map(|&i| {
                let v = &self.views[i];
                if v.depends_on.is_empty() {
                    v.name.clone()
                } else {
                    let deps: Vec<&str> = v
                        .depends_on
                        .iter()
                        .map(|&d| self.views[d].name.as_str())
                        .collect();
                    format!("{} (after {})", v.name, deps.join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join(" → ")
    }
}

async fn resolve(
    client: &impl GenericClient,
    rel: &Relation,
) -> Result<Option<Resolved>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT c.oid, n.nspname, c.relname, c.relkind, c.relispopulated,
                    pg_has_role(current_user, c.relowner, 'USAGE')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = to_regclass($1)",
            &[&rel.quoted()],
        )
        .await?;
    Ok(row.map(|row| Resolved {
        oid: row.get(0),
        target: format!("{}.{}", ident(row.get(1)), ident(row.get(2))),
        relkind: row.get(3),
        populated: row.get(4),
        owner: row.get(5),
    }))
}

/// Resolves one view and checks it can be refreshed in its mode: the relation, and its refresh
/// function for `incremental`; with the problems that keep it from being refreshed.
async fn check_view(
    client: &impl GenericClient,
    v: &ViewConfig,
) -> Result<(Option<Checked>, Vec<Problem>), PlanError> {
    let name = v.relation().to_string();
    let problem = |message: String, fix: String| Problem {
        view: name.clone(),
        message,
        fix,
    };
    let Some(mut r) = resolve(client, v.relation()).await? else {
        let fix = missing_fix(v.mode).to_owned();
        return Ok((None, vec![problem("does not exist".into(), fix)]));
    };
    let mut problems = Vec::new();
    let mut function = None;
    let mut partition = None;
    match v.mode {
        Mode::Concurrently | Mode::Blocking if r.relkind != b'm' as i8 => {
            problems.push(problem(
                "is not a materialized view".into(),
                "use mode = \"incremental\" with a refresh function for tables".into(),
            ));
        }
        Mode::Concurrently => {
            if crate::partition::unique_columns(client, r.oid)
                .await?
                .is_none()
            {
                problems.push(problem(
                    "has no usable unique index, which REFRESH MATERIALIZED VIEW CONCURRENTLY needs (a UNIQUE index on plain columns, without WHERE)".into(),
                    format!(
                        "CREATE UNIQUE INDEX ON {} (<columns that identify a row>), or set mode = \"blocking\"",
                        r.target
                    ),
                ));
            }
        }
        Mode::Blocking => {}
        Mode::Partitioned if !matches!(r.relkind as u8, b'r' | b'p') => {
            problems.push(problem(
                "is not a table: mode `partitioned` keeps a table equal to its source".into(),
                "drop it and run `mvrefresh install` (it creates the table), or fix `name`".into(),
            ));
        }
        Mode::Partitioned => match crate::partition::resolve(client, v, r.oid, &r.target).await? {
            Ok(p) => {
                // Empty: never filled (or an empty source); everything is recomputed at start.
                r.populated = has_rows(client, &r.target).await?;
                partition = Some(p);
            }
            Err(unfit) => problems.extend(unfit.into_iter().map(|u| problem(u.message, u.fix))),
        },
        Mode::Incremental => {
            // Validated at load: an incremental view names its function.
            let Some(rel) = &v.function else {
                let fix = "set `function`".to_owned();
                problems.push(problem("mode `incremental` needs `function`".into(), fix));
                return Ok((None, problems));
            };
            function = resolve_function(client, rel).await?;
            if function.is_none() {
                problems.push(problem(
                    format!("refresh function {rel}(text[]) does not exist"),
                    "create it (`mvrefresh install --analytics` for the bundled ones) or fix `function`".into(),
                ));
            }
        }
    }
    // A partitioned view's table needs privileges, not ownership (checked with them).
    if !r.owner && v.mode != Mode::Partitioned {
        problems.push(problem(
            "is not owned by the connecting role, and only its owner may refresh it".into(),
            format!(
                "ALTER ... {} OWNER TO <this role>, or connect as its owner",
                r.target
            ),
        ));
    }
    Ok((
        Some(Checked {
            resolved: r,
            function,
            partition,
        }),
        problems,
    ))
}

/// What to do about a view of `mode` that does not exist.
fn missing_fix(mode: Mode) -> &'static str {
    match mode {
        Mode::Partitioned => "run `mvrefresh install` (it creates the table from the source)",
        Mode::Incremental => {
            "create the table (`mvrefresh install --analytics` for the bundled ones)"
        }
        Mode::Concurrently | Mode::Blocking => {
            "create the materialized view (`mvrefresh install --analytics` for the bundled ones) or fix `name`"
        }
    }
}

/// Whether the relation `target` (quoted) has a row.
async fn has_rows(
    client: &impl GenericClient,
    target: &str,
) -> Result<bool, tokio_postgres::Error> {
    let sql = format!("SELECT EXISTS (SELECT FROM {target})");
    Ok(client.query_one(&sql, &[]).await?.get(0))
}

/// The quoted, schema-qualified name of the function `rel(text[])`, when it exists.
async fn resolve_function(
    client: &impl GenericClient,
    rel: &Relation,
) -> Result<Option<String>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT n.nspname, p.proname FROM pg_proc p
             JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE p.oid = to_regprocedure($1)",
            &[&format!("{}(text[])", rel.quoted())],
        )
        .await?;
    Ok(row.map(|row| format!("{}.{}", ident(row.get(0)), ident(row.get(1)))))
}

/// Which of the relations `oids` each one reads, through plain views (`pg_depend` over the
/// rewrite rules), starting from `roots[i]` for `oids[i]` (itself, or a partitioned view's
/// source); indexes into `oids`.
async fn catalog_dependencies(
    client: &impl GenericClient,
    roots: &[u32],
    oids: &[u32],
) -> Result<Vec<BTreeSet<usize>>, PlanError> {
    let rows = client
        .query(
            "WITH RECURSIVE deps(root, rel) AS (
                 SELECT v, v FROM unnest($1::oid[]) AS v
                 UNION
                 SELECT d.root, dep.refobjid
                 FROM deps d
                 JOIN pg_class c ON c.oid = d.rel
                 JOIN pg_rewrite r ON r.ev_class = d.rel
                 JOIN pg_depend dep ON dep.classid = 'pg_rewrite'::regclass
                      AND dep.objid = r.oid
                      AND dep.refclassid = 'pg_class'::regclass
                      AND dep.refobjid <> d.rel
                 WHERE d.rel = d.root OR c.relkind = 'v')
             SELECT root, rel FROM deps WHERE rel <> root AND rel = ANY($2)",
            &[&roots, &oids],
        )
        .await?;
    let mut depends_on: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); oids.len()];
    for row in rows {
        let (root, rel): (u32, u32) = (row.get(0), row.get(1));
        let Some(b) = oids.iter().position(|o| *o == rel) else {
            continue;
        };
        for (a, _) in roots.iter().enumerate().filter(|(_, r)| **r == root) {
            if a != b {
                depends_on[a].insert(b);
            }
        }
    }
    Ok(depends_on)
}

/// Fills each view's ancestors and dependents from `depends_on`, walking `order`.
fn link(mut views: Vec<View>, order: &[usize]) -> Vec<View> {
    for &i in order {
        let mut anc = BTreeSet::new();
        for &d in &views[i].depends_on {
            anc.insert(d);
            anc.extend(views[d].ancestors.iter().copied());
        }
        views[i].ancestors = anc;
        for d in views[i].depends_on.clone() {
            views[d].dependents.push(i);
        }
    }
    views
}

/// Kahn's algorithm, stable in configuration order. A cycle names its views.
pub fn topo_order(
    names: &[String],
    depends_on: &[BTreeSet<usize>],
) -> Result<Vec<usize>, PlanError> {
    let n = names.len();
    let mut done = vec![false; n];
    let mut order = Vec::with_capacity(n);
    while order.len() < n {
        let next = (0..n).find(|&i| !done[i] && depends_on[i].iter().all(|&d| done[d]));
        match next {
            Some(i) => {
                done[i] = true;
                order.push(i);
            }
            None => {
                let stuck: Vec<&str> = (0..n)
                    .filter(|&i| !done[i])
                    .map(|i| names[i].as_str())
                    .collect();
                return Err(PlanError::Cycle(stuck.join(", ")));
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn chain_sorted_dependencies_first() {
        let deps = vec![BTreeSet::from([1]), BTreeSet::from([2]), BTreeSet::new()];
        assert_eq!(
            topo_order(&names(&["c", "b", "a"]), &deps).unwrap(),
            [2, 1, 0]
        );
    }

    #[test]
    fn cycle_is_named() {
        let deps = vec![BTreeSet::from([1]), BTreeSet::from([0]), BTreeSet::new()];
        let err = topo_order(&names(&["x", "y", "z"]), &deps).unwrap_err();
        assert!(err.to_string().contains("x, y"), "{err}");
    }
}

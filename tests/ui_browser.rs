//! The web view in headless Chromium (Debian's) on a real `gitstate serve` after real Terraform
//! applies: states, the lock badge, history, a diff, the force-unlock button, a `<script>` output
//! that must not run, a phone-sized window. Screenshots go to `target/ui-screenshots/`.

use std::path::PathBuf;

use gitstate_testkit::browser::Browser;
use gitstate_testkit::fixtures::lock_info_value;
use gitstate_testkit::serve::{http, http_json, Serve, ServeOpts};
use gitstate_testkit::terraform::{hcl_string, HttpBackend, TfWorkdir};

const PATH: &str = "envs/prod.tfstate";
/// An output value that would retitle the page if it ever ran as script.
const SCRIPT: &str = "<script>document.title='pwned';window.pwned=1</script>";

fn screenshots() -> PathBuf {
    gitstate_testkit::repo_root().join("target/ui-screenshots")
}

fn outputs(greeting: &str) -> String {
    format!(
        "output \"greeting\" {{\n  value = {}\n}}\noutput \"evil\" {{\n  value = {}\n}}\noutput \"db_password\" {{\n  value = \"hunter2-in-state\"\n  sensitive = true\n}}\n",
        hcl_string(greeting),
        hcl_string(SCRIPT)
    )
}

/// The page's script did not run: its title is ours and the global it would set is absent.
#[track_caller]
fn no_script_ran(browser: &Browser) {
    let title = browser.title();
    assert!(title.ends_with("· gitstate") && !title.contains("pwned"), "title {title:?}");
    assert_eq!(browser.eval("return typeof window.pwned;"), "undefined");
}

#[test]
fn the_web_view_in_chromium_after_terraform_applies() {
    let serve = Serve::start(ServeOpts::new());
    let mut tf = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url(PATH)));
    tf.set_body(&outputs("hello"));
    tf.init().assert_success();
    tf.apply().assert_success();
    tf.set_body(&outputs("hello again"));
    tf.apply().assert_success();
    let other = TfWorkdir::new(HttpBackend::lock_unlock(serve.state_url("envs/dev.tfstate")));
    other.init().assert_success();
    other.apply().assert_success();

    let browser = Browser::start();
    let ui = format!("{}/ui/", serve.base_url());

    // The states, none locked.
    browser.goto(&ui);
    let source = browser.source();
    assert!(source.contains(PATH) && source.contains("envs/dev.tfstate"), "{source}");
    assert_eq!(browser.find("a[href='./state/envs/prod.tfstate']").text(), PATH);
    assert!(!source.contains("locked by"), "{source}");
    browser.screenshot(&screenshots().join("states.png"));

    // A lock held as Terraform holds one: the badge names the holder.
    let holder = lock_info_value("6f1c2a4e-0000-4000-8000-00000000beef", "alice@laptop", "OperationTypeApply");
    let locked = http_json("LOCK", &serve.state_url(PATH), &holder);
    assert_eq!(locked.status, 200, "{}", locked.text());
    browser.goto(&ui);
    let badge = browser.find("span.badge.locked").text();
    assert!(badge.contains("locked by alice@laptop") && badge.contains("Apply"), "{badge}");
    browser.screenshot(&screenshots().join("states-locked.png"));

    // The state: its lock panel, outputs (the script as text, the sensitive one by name), history.
    browser.link(PATH).click();
    browser.wait_until("the state's page", |b| b.current_url().ends_with("/ui/state/envs/prod.tfstate"));
    assert!(browser.current_url().ends_with("/ui/state/envs/prod.tfstate"), "{}", browser.current_url());
    no_script_ran(&browser);
    let lock_panel = browser.find("div.panel.locked").text();
    assert!(
        lock_panel.contains("6f1c2a4e-0000-4000-8000-00000000beef") && lock_panel.contains("alice@laptop"),
        "{lock_panel}"
    );
    let outputs_table = browser.find("table.outputs").text();
    assert!(outputs_table.contains(SCRIPT), "the script shows as text: {outputs_table}");
    assert!(outputs_table.contains("db_password") && !outputs_table.contains("hunter2"), "{outputs_table}");
    assert!(!browser.source().contains("hunter2"));
    let history = browser.find("table.history").text();
    assert_eq!(history.lines().filter(|l| l.contains("Apply")).count(), 2, "two applies: {history}");
    browser.screenshot(&screenshots().join("state.png"));

    // The diff of the newest version names the changed output.
    browser.link("diff").click();
    browser.wait_until("the diff page", |b| b.current_url().contains("/ui/diff/"));
    no_script_ran(&browser);
    let changed = browser.find("table.outputs").text();
    assert!(
        changed.contains("greeting") && changed.contains("\"hello\"") && changed.contains("\"hello again\""),
        "{changed}"
    );
    assert!(!changed.contains("evil"), "an unchanged output is not listed: {changed}");
    browser.screenshot(&screenshots().join("diff.png"));

    // Force-unlock through the button, with the lock ID typed back.
    browser.goto(&format!("{}/ui/state/{PATH}", serve.base_url()));
    browser.find("#lock_id").type_text("6f1c2a4e-0000-4000-8000-00000000beef");
    browser.find("form.unlock button").click();
    browser.wait_until("the page after the unlock", |b| b.source().contains("Nobody holds this state"));
    assert!(
        browser.current_url().ends_with("/ui/state/envs/prod.tfstate"),
        "{}: {}",
        browser.current_url(),
        browser.source()
    );
    assert!(browser.source().contains("Nobody holds this state"), "{}", browser.source());
    no_script_ran(&browser);
    browser.screenshot(&screenshots().join("unlocked.png"));
    assert_eq!(http("GET", &serve.lock_url(PATH), &[], None).status, 404, "the lock is gone");
    let log = serve.stderr_log();
    assert!(log.contains("force-unlock from the web view"), "the force-unlock is logged:\n{log}");

    // On a phone: nothing wider than the screen (wide tables scroll inside their box).
    browser.set_window(390, 844);
    for page in [ui.clone(), format!("{}/ui/state/{PATH}", serve.base_url())] {
        browser.goto(&page);
        let widths = browser.eval("return [document.documentElement.scrollWidth, window.innerWidth];");
        let (content, screen) = (widths[0].as_u64().unwrap(), widths[1].as_u64().unwrap());
        assert!(content <= screen, "{page}: {content} px of content on a {screen} px screen");
    }
    browser.screenshot(&screenshots().join("state-phone.png"));
    browser.set_window(1200, 1000);

    // Terraform works on after the unlock.
    tf.set_body(&outputs("after the unlock"));
    tf.apply().assert_success();
    browser.goto(&ui);
    assert!(!browser.source().contains("locked by"));
}

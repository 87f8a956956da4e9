fn main() {
    print!("{}", kube_nsg::api::crds_yaml());
}

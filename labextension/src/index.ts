/**
 * spunnel-jupyter's frontend: a launcher tile and a palette command ("Jupyter on a compute node")
 * that open one panel to start, watch, open and stop the session. The launcher, the palette and
 * the layout restorer are optional, so the plugin also loads in Notebook 7.
 */
import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget, WidgetTracker } from '@jupyterlab/apputils';
import { ILauncher } from '@jupyterlab/launcher';
import { LabIcon } from '@jupyterlab/ui-components';

import svgstr from '../style/icons/compute-node.svg';
import { SpunnelAPI } from './api';
import { SpunnelPanel } from './panel';

const COMMAND = 'spunnel:open';
const CATEGORY = 'HPC';

export const computeNodeIcon = new LabIcon({ name: 'spunnel:compute-node', svgstr });

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'spunnel-jupyter:plugin',
  description: 'Start Jupyter on a Slurm compute node from JupyterLab.',
  autoStart: true,
  optional: [ILauncher, ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    launcher: ILauncher | null,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ) => {
    const tracker = new WidgetTracker<MainAreaWidget<SpunnelPanel>>({ namespace: 'spunnel' });

    app.commands.addCommand(COMMAND, {
      label: 'Jupyter on a compute node',
      caption: 'Start Jupyter on a Slurm compute node, tunnelled back here',
      icon: computeNodeIcon,
      // One panel: a user has at most one session per login host.
      execute: () => {
        let widget = tracker.currentWidget;
        if (!widget || widget.isDisposed) {
          widget = new MainAreaWidget({ content: new SpunnelPanel(new SpunnelAPI()) });
          widget.id = 'spunnel-main';
          widget.title.label = 'Compute node';
          widget.title.icon = computeNodeIcon;
          void tracker.add(widget);
        }
        if (!widget.isAttached) {
          app.shell.add(widget, 'main');
        }
        app.shell.activateById(widget.id);
        // The launcher replaces itself with a widget a command returns.
        return widget;
      }
    });

    launcher?.add({ command: COMMAND, category: CATEGORY, rank: 1 });
    palette?.addItem({ command: COMMAND, category: CATEGORY });
    void restorer?.restore(tracker, { command: COMMAND, name: () => 'spunnel' });
  }
};

export default plugin;
